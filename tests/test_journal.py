"""The write journal on disk: order, aborts, request ids, torn tails, trimming."""
from __future__ import annotations

from django_lb_shm.descriptors import Result, Statement
from django_lb_shm.journal import Journal, JournalEntry


def entry(seq: int, request_id: str = "") -> JournalEntry:
    return JournalEntry(seq, request_id or f"r{seq}", [Statement("UPDATE t SET x = %s", (seq,))],
                        Result(rows=[(seq,)]), "DB1")


def test_entries_survive_a_reopen_in_order(tmp_path):
    journal = Journal(tmp_path, fsync=True).open()
    for seq in range(1, 6):
        journal.append(entry(seq))
    journal.close()
    again = Journal(tmp_path).open()
    assert [e.seq for e in again.entries_after(2)] == [3, 4, 5]
    assert again.last_seq == 5
    assert again.find_request("r4").result.rows == [(4,)]  # answers a repeated request id


def test_aborted_entries_are_not_replayed_but_keep_the_sequence_covered(tmp_path):
    journal = Journal(tmp_path).open()
    journal.append(entry(1))
    journal.append(entry(2))
    journal.abort(2)
    journal.append(entry(3))
    journal.close()
    again = Journal(tmp_path).open()
    assert [e.seq for e in again.entries_after(0)] == [1, 3]
    assert again.find_request("r2") is None
    assert again.covers(0)


def test_a_torn_tail_is_cut_and_later_appends_are_readable(tmp_path):
    journal = Journal(tmp_path).open()
    for seq in (1, 2):
        journal.append(entry(seq))
    journal.close()
    segment = next(tmp_path.glob("*.journal"))
    data = segment.read_bytes()
    segment.write_bytes(data + data[:20])  # a crash in the middle of a third record
    again = Journal(tmp_path).open()
    assert [e.seq for e in again.entries_after(0)] == [1, 2]
    again.append(entry(3))
    again.close()
    assert [e.seq for e in Journal(tmp_path).open().entries_after(0)] == [1, 2, 3]


def test_trim_removes_whole_segments_every_database_applied(tmp_path):
    journal = Journal(tmp_path, segment_entries=3).open()
    for seq in range(1, 11):
        journal.append(entry(seq))
    assert len(list(tmp_path.glob("*.journal"))) == 4
    assert journal.trim(applied_everywhere=5) == 1        # only [1..3] is fully applied
    assert [e.seq for e in journal.entries_after(0)][0] == 4
    assert not journal.covers(1)                           # a database at #1 can no longer catch up
    assert journal.covers(3)
    journal.trim(applied_everywhere=10)
    assert len(list(tmp_path.glob("*.journal"))) == 1      # the active segment stays
    journal.close()
    assert Journal(tmp_path).open().last_seq == 10
