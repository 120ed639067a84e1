"""The write journal on disk: order, void records, request ids, a full disk, the old
segment format, trimming, and the history check that keeps a copy with a gap out."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest

from django_lb_shm.wire.descriptors import Result, Statement
from django_lb_shm.errors import JournalCorrupt, JournalError
from django_lb_shm.coordinator.journal import _HEADER, Journal, JournalEntry
from django_lb_shm.coordinator.sequencer import gap_in_history


def entry(seq: int, request_id: str = "", size: int = 0) -> JournalEntry:
    params = (seq, "x" * size) if size else (seq,)
    return JournalEntry(seq, request_id or f"r{seq}", [Statement("UPDATE t SET x = %s", params)],
                        Result(rows=[(seq,)]), "DB1")


def test_entries_survive_a_reopen_in_order(tmp_path):
    journal = Journal(tmp_path, fsync=True).open()
    for seq in range(1, 6):
        journal.append(entry(seq))
    journal.close()
    again = Journal(tmp_path).open()
    assert [e.seq for e in again.entries_after(2)] == [3, 4, 5]
    assert again.last_seq == 5 and again.entry_count == 5
    found = again.find_request("r4")
    assert found.result.rows == [(4,)] and found.statements[0].params == (4,)  # answers a repeated request id
    assert again.find_request("nope") is None


def test_a_group_is_appended_whole(tmp_path):
    journal = Journal(tmp_path).open()
    journal.append_many([entry(1), entry(2), entry(3)])
    with pytest.raises(JournalError):
        journal.append_many([entry(4), entry(3)])      # 3 again: the whole group is refused
    assert [e.seq for e in journal.entries_after(0)] == [1, 2, 3]
    assert journal.last_seq == 3


def test_a_void_record_keeps_its_number_and_tag_but_applies_nothing(tmp_path):
    journal = Journal(tmp_path).open()
    journal.append(entry(1))
    refused = entry(2)
    journal.append(refused)
    journal.void([refused.voided()])
    journal.append(entry(3))
    journal.close()
    again = Journal(tmp_path).open()
    replay = again.entries_after(0)
    assert [(e.seq, e.void, len(e.statements)) for e in replay] == [(1, False, 1), (2, True, 0), (3, False, 1)]
    assert replay[1].tag == refused.tag and again.tag_at(2) == refused.tag
    assert again.find_request("r2").void
    assert again.covers(0, 3)


def test_records_are_read_back_a_chunk_at_a_time(tmp_path):
    journal = Journal(tmp_path).open()
    journal.append_many([entry(seq) for seq in range(1, 601)])
    assert len(journal.entries_after(0)) == 256                 # one chunk
    assert [e.seq for e in journal.iter_after(100, lambda: 600)] == list(range(101, 601))


def test_trim_keeps_the_last_record_every_copy_applied(tmp_path):
    journal = Journal(tmp_path).open()
    for seq in range(1, 11):
        journal.append(entry(seq))
    assert journal.trim(applied_everywhere=5) == 4
    assert [e.seq for e in journal.entries_after(0)][0] == 5    # kept: its tag checks a copy at #5
    assert journal.covers(5, 10) and not journal.covers(3, 10)
    assert journal.tag_at(5) is not None and journal.tag_at(4) is None
    journal.trim(applied_everywhere=10)
    journal.close()
    again = Journal(tmp_path).open()
    assert again.last_seq == 10 and again.entry_count == 1


def test_a_second_coordinator_cannot_open_the_same_journal(tmp_path):
    first = Journal(tmp_path).open()
    with pytest.raises(JournalError, match="in use by another coordinator"):
        Journal(tmp_path).open()
    first.close()
    Journal(tmp_path).open().close()


def test_a_journal_of_a_newer_format_is_refused(tmp_path):
    import sqlite3

    Journal(tmp_path).open().close()
    db = sqlite3.connect(str(tmp_path / "journal.sqlite3"))
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(JournalError, match="newer than this"):
        Journal(tmp_path).open()


# -- the history check: a copy's marker against the journal --------------------------------
def test_history_check(tmp_path):
    journal = Journal(tmp_path).open()
    records = [entry(seq) for seq in range(1, 6)]
    journal.append_many(records)
    assert gap_in_history(journal, 5, records[4].tag, 5) == ""            # up to date
    assert gap_in_history(journal, 2, records[1].tag, 5) == ""            # behind, the journal has the rest
    assert gap_in_history(journal, 2, 0, 5) == ""                         # a marker of the old format: no tag
    assert "not the journal's write #2" in gap_in_history(journal, 2, 12345, 5)
    assert "up to #7" in gap_in_history(journal, 7, 1, 5)                # ahead of everything
    journal.trim(4)
    assert "no longer holds" in gap_in_history(journal, 2, 0, 5)


def test_a_new_journal_rebased_on_the_copies_lets_no_copy_with_a_gap_in(tmp_path):
    journal = Journal(tmp_path).open()          # the old journal is gone; copies are at #15 and #5
    journal.rebase(15, 777)
    assert journal.last_seq == 15
    assert gap_in_history(journal, 15, 777, 15) == ""
    assert "no longer holds" in gap_in_history(journal, 5, 0, 15)
    journal.append(entry(16))
    journal.close()
    again = Journal(tmp_path).open()
    assert again.last_seq == 16 and again.tag_at(15) == 777
    assert "not the journal's write #15" in gap_in_history(again, 15, 778, 16)


# -- a full disk --------------------------------------------------------------------------------
@contextmanager
def tiny_tmpfs(path, size: str = "256k"):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_refuses_the_append_whole_and_the_journal_goes_on(tmp_path):
    with tiny_tmpfs(tmp_path / "fs") as fs:
        journal = Journal(fs).open()
        seq, refused = 0, None
        for _ in range(200):
            try:
                journal.append(entry(seq + 1, size=30_000))
            except JournalError as exc:
                refused = exc
                break
            seq += 1
        assert refused is not None and "JOURNAL_DIR" in str(refused) and "applied nowhere" in str(refused)
        assert journal.last_seq == seq and [e.seq for e in journal.entries_after(0)][-1] == seq
        subprocess.run(["mount", "-o", "remount,size=4m", str(fs)], check=True)   # space comes back
        journal.append(entry(seq + 1))
        journal.close()
        again = Journal(fs).open()
        assert again.last_seq == seq + 1
        assert [e.seq for e in again.entries_after(0)] == list(range(1, seq + 2))


# -- segment files of the old format --------------------------------------------------------------
def _old_record(payload) -> bytes:
    data = pickle.dumps(payload)
    return _HEADER.pack(len(data), zlib.crc32(data)) + data


def _old_segment(path, records) -> None:
    path.write_bytes(b"".join(_old_record(r) for r in records))


def test_old_segments_are_imported_once_with_aborts_as_void(tmp_path):
    old = [("E", entry(1)), ("E", entry(2)), ("A", 2), ("E", entry(3))]
    _old_segment(tmp_path / f"{1:020d}.journal", old)
    (tmp_path / f"{1:020d}.journal").write_bytes((tmp_path / f"{1:020d}.journal").read_bytes() + b"\x05\x00")
    journal = Journal(tmp_path).open()                            # the torn tail is ignored
    assert [(e.seq, e.void) for e in journal.entries_after(0)] == [(1, False), (2, True), (3, False)]
    assert journal.find_request("r1").result.rows == [(1,)]
    journal.close()
    assert not list(tmp_path.glob("*.journal")) and list(tmp_path.glob("*.journal.imported"))
    assert Journal(tmp_path).open().entry_count == 3


def test_an_old_segment_damaged_in_the_middle_is_refused_naming_the_offset(tmp_path):
    # Entries carry a random tag, so a record's length varies: measure the records written.
    parts = [_old_record(("E", entry(seq))) for seq in (1, 2, 3)]
    records, first = b"".join(parts), len(parts[0])
    damaged = records[:first + 10] + b"\xff" + records[first + 11:]   # record 2 broken, 3 intact
    (tmp_path / f"{1:020d}.journal").write_bytes(damaged)
    with pytest.raises(JournalCorrupt, match=f"byte {first}"):
        Journal(tmp_path).open()
    assert list(tmp_path.glob("*.journal"))                       # nothing renamed, nothing lost


def test_an_older_default_directory_is_imported_into_a_new_journal(tmp_path):
    legacy = tmp_path / "5577"
    legacy.mkdir()
    _old_segment(legacy / f"{1:020d}.journal", [("E", entry(1)), ("E", entry(2))])
    journal = Journal(tmp_path / "databases-x", import_from=[legacy]).open()
    assert journal.last_seq == 2 and [e.seq for e in journal.entries_after(0)] == [1, 2]


def test_the_journal_is_private_to_the_coordinators_user(tmp_path, caplog):
    journal = Journal(tmp_path / "new").open()
    journal.append(entry(1))
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "new").iterdir()}
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700
    assert modes["journal.sqlite3"] == 0o600 and modes["journal.sqlite3-wal"] == 0o600, modes
    journal.close()
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    Journal(loose).open().close()
    assert "readable or writable by other users" in caplog.text


def test_a_format_0_segment_written_by_0_1_is_imported(tmp_path):
    """tests/fixtures/format0-0.1.journal was written by version 0.1 before the modules moved into
    folders: its pickles name django_lb_shm.coordinator.journal.JournalEntry and django_lb_shm.descriptors.*."""
    fixture = Path(__file__).parent / "fixtures" / "format0-0.1.journal"
    shutil.copy(fixture, tmp_path / f"{1:020d}.journal")
    journal = Journal(tmp_path).open()
    entries = journal.entries_after(0)
    assert [(e.seq, e.request_id, e.void) for e in entries] == [(1, "req-1", False), (2, "req-2", True), (3, "req-3", False)]
    assert entries[0].statements[0].params == (1, "one") and entries[0].result.lastrowid == 1
    assert entries[2].statements[0].sql == "DELETE FROM t WHERE id = %s" and entries[2].database == "DB1"
    assert journal.find_request("req-3").result.rowcount == 1
    journal.close()
