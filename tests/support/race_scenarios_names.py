"""The scenarios of race_scenarios.py (which configures Django itself, so is not imported here)."""
SCENARIOS = (
    "replay_never_reads_an_undecided_record",
    "a_request_sent_twice_in_one_group_is_applied_once",
    "a_write_that_ends_the_transaction_leaves_the_group_whole",
    "an_error_caused_by_a_voided_groupmate_is_not_reported",
)
