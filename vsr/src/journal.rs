//! The journal: an append-only file of checksummed records, made durable in groups.
//!
//! Records are replayed in file order: an `Entry` record sets the entry of its op (a later record
//! for the same op, written by a repair, wins), a `Truncate` record drops every op above its own
//! (a view change replaced an uncommitted suffix). Appends are buffered and written with one
//! write and one `fdatasync` per flush, which is the group commit.
//!
//! Corruption is local: a record whose header checksum fails is skipped by scanning forward to
//! the next valid header (records are 8-byte aligned), a record whose body fails its checksum is
//! skipped too; either way its op is reported corrupt and the replica repairs it from peers.

use std::collections::{BTreeMap, BTreeSet};
use std::io;

use bytes::{BufMut, Bytes};

use crate::checksum::checksum;
use crate::message::Entry;
use crate::storage::{Storage, Zone, read_exact_at};

const MAGIC: u32 = 0x4a52_5356; // "VSRJ"
const RECORD_HEADER_SIZE: usize = 56;
const RECORD_ALIGNMENT: u64 = 8;
const KIND_ENTRY: u8 = 1;
const KIND_TRUNCATE: u8 = 2;
/// Covers a stretch erased after recovery: skipped by the scan, never a gap.
const KIND_PADDING: u8 = 3;
/// Names the head of a log adopted from another replica (op, entry checksum) before its entry
/// may be here: the head a restart resumes from, whatever older records above the commit say.
const KIND_HEAD: u8 = 4;
const OFFSET_NONE: u64 = u64::MAX;

/// What `Journal::open` found on disk.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct JournalScan {
    /// Ops whose newest record failed its checksum and that no later record replaced.
    pub corrupt_ops: BTreeSet<u64>,
    /// Record headers that failed their checksum (their op is unknown), torn tail included.
    pub corrupt_headers: u64,
}

/// A run of bytes that decode as no record: a torn tail or a corrupt header (and whatever
/// followed it up to the next record that decodes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CorruptRun {
    start: u64,
    end: u64,
    /// After the last record that decodes: new records are written over it.
    tail: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadError {
    /// No record for this op.
    Missing,
    /// The record is there but fails its checksum now (bit rot since open).
    Corrupt,
}

/// One group commit, for the `journal_write` probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushStats {
    pub records: u32,
    pub bytes: u64,
}

#[derive(Debug)]
pub struct Journal {
    /// File offset of each op's newest record, or `OFFSET_NONE` (a corrupt record): only the
    /// ops after the previous checkpoint interval, so bounded by configuration.
    offsets: BTreeMap<u64, u64>,
    /// Where the scan starts: every record before it is covered by a checkpoint (and its bytes
    /// may be gone).
    start: u64,
    /// Ops below it were forgotten (`discard_before`) since open.
    forgotten_below: u64,
    /// Bytes durable (or at least written) in the file.
    durable_end: u64,
    pending: Vec<u8>,
    pending_records: u32,
    /// Found at open; erased once the replica no longer needs what they may have hidden.
    corrupt_runs: Vec<CorruptRun>,
    /// The newest head record (op, entry checksum) not superseded by a later entry above it
    /// or a truncation below it.
    head: Option<(u64, u64)>,
}

struct RecordHeader {
    kind: u8,
    op: u64,
    view: u64,
    parent: u64,
    entry_checksum: u64,
    body_size: u32,
}

impl RecordHeader {
    fn encode(&self) -> [u8; RECORD_HEADER_SIZE] {
        let mut out = [0u8; RECORD_HEADER_SIZE];
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4] = self.kind;
        out[16..24].copy_from_slice(&self.op.to_le_bytes());
        out[24..32].copy_from_slice(&self.view.to_le_bytes());
        out[32..40].copy_from_slice(&self.parent.to_le_bytes());
        out[40..48].copy_from_slice(&self.entry_checksum.to_le_bytes());
        out[48..52].copy_from_slice(&self.body_size.to_le_bytes());
        let header_checksum = header_checksum(&out);
        out[8..16].copy_from_slice(&header_checksum.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8; RECORD_HEADER_SIZE]) -> Option<RecordHeader> {
        let u64_at = |start: usize| u64::from_le_bytes(bytes[start..start + 8].try_into().unwrap());
        let magic = u32::from_le_bytes(bytes[0..4].try_into().unwrap());
        if magic != MAGIC || u64_at(8) != header_checksum(bytes) {
            return None;
        }
        let header = RecordHeader {
            kind: bytes[4],
            op: u64_at(16),
            view: u64_at(24),
            parent: u64_at(32),
            entry_checksum: u64_at(40),
            body_size: u32::from_le_bytes(bytes[48..52].try_into().unwrap()),
        };
        let valid = match header.kind {
            KIND_ENTRY => header.op > 0,
            KIND_TRUNCATE | KIND_HEAD => header.op > 0 && header.body_size == 0,
            KIND_PADDING => header.op == 0,
            _ => false,
        };
        valid.then_some(header)
    }

    fn record_size(&self) -> u64 {
        (RECORD_HEADER_SIZE as u64 + u64::from(self.body_size)).next_multiple_of(RECORD_ALIGNMENT)
    }
}

fn header_checksum(header: &[u8; RECORD_HEADER_SIZE]) -> u64 {
    checksum(&[&header[0..8], &header[16..]].concat())
}

impl Journal {
    /// Scans the journal from `start` (the superblock's `journal_start`), rebuilding the op
    /// index and finding corrupt records.
    pub fn open(storage: &mut impl Storage, start: u64) -> io::Result<(Journal, JournalScan)> {
        let size = storage.size(Zone::Journal)?;
        let mut journal = Journal {
            offsets: BTreeMap::new(),
            start,
            forgotten_below: 0,
            durable_end: start,
            pending: Vec::new(),
            pending_records: 0,
            corrupt_runs: Vec::new(),
            head: None,
        };
        let mut scan = JournalScan::default();
        let mut offset = start;
        let mut header_bytes = [0u8; RECORD_HEADER_SIZE];
        // Bytes that decode as no record, since the last record that did: a gap between two
        // records is corruption (or a torn write out of order) whatever it holds, since records
        // are written back to back; after the last record only non-zero bytes count.
        let mut gap: Option<(u64, bool)> = None;
        let mut valid_end = start;
        while offset + RECORD_HEADER_SIZE as u64 <= size {
            // Bytes a crash never let reach the disk (a segment left short, with a later one
            // already created) read as zeros: no record, never the previous buffer's.
            header_bytes.fill(0);
            read_exact_at(storage, Zone::Journal, offset, &mut header_bytes)?;
            let Some(header) = RecordHeader::decode(&header_bytes)
                .filter(|header| offset + header.record_size() <= size)
            else {
                let nonzero = header_bytes[..RECORD_ALIGNMENT as usize]
                    .iter()
                    .any(|byte| *byte != 0);
                let (start, any_nonzero) = gap.unwrap_or((offset, false));
                gap = Some((start, any_nonzero || nonzero));
                offset += RECORD_ALIGNMENT;
                continue;
            };
            if let Some((start, _)) = gap.take() {
                scan.corrupt_headers += 1;
                journal.corrupt_runs.push(CorruptRun {
                    start,
                    end: offset,
                    tail: false,
                });
            }
            match header.kind {
                KIND_PADDING => {}
                KIND_HEAD => journal.head = Some((header.op, header.entry_checksum)),
                KIND_TRUNCATE => {
                    journal.truncate_index(header.op);
                    scan.corrupt_ops.retain(|op| *op <= header.op);
                }
                _ => {
                    let entry = journal.read_record(storage, offset, &header)?;
                    if entry.checksum_valid() {
                        journal.set_offset(header.op, offset);
                        scan.corrupt_ops.remove(&header.op);
                    } else {
                        journal.set_offset(header.op, OFFSET_NONE);
                        scan.corrupt_ops.insert(header.op);
                    }
                }
            }
            offset += header.record_size();
            valid_end = offset;
        }
        if let Some((start, true)) = gap {
            scan.corrupt_headers += 1;
            journal.corrupt_runs.push(CorruptRun {
                start,
                end: size,
                tail: true,
            });
        }
        // New records go after the last record that decodes: a torn or corrupt tail is
        // overwritten, never trusted, and never left in front of new records.
        journal.durable_end = valid_end.max(start);
        Ok((journal, scan))
    }

    fn set_offset(&mut self, op: u64, offset: u64) {
        self.offsets.insert(op, offset);
        if self.head.is_some_and(|(head, _)| op > head) {
            self.head = None;
        }
    }

    fn truncate_index(&mut self, op: u64) {
        self.offsets.split_off(&(op + 1));
        if self.head.is_some_and(|(head, _)| head > op) {
            self.head = None;
        }
    }

    /// Buffers a record naming `(op, checksum)` the log's head, for a head adopted from
    /// another replica whose entry may not be here yet.
    pub fn pin_head(&mut self, op: u64, checksum: u64) {
        assert!(op > 0);
        let header = RecordHeader {
            kind: KIND_HEAD,
            op,
            view: 0,
            parent: 0,
            entry_checksum: checksum,
            body_size: 0,
        };
        self.push_record(&header, &[]);
        self.head = Some((op, checksum));
    }

    /// The newest pinned head still in force: no entry above it or truncation below it since.
    pub fn pinned_head(&self) -> Option<(u64, u64)> {
        self.head
    }

    /// Forgets every op below `keep_from` (a checkpoint covers them), moving the scan start
    /// past their records where it can. The caller records the new start in the superblock
    /// (with that checkpoint) before it discards the bytes in front of it.
    pub fn discard_before(&mut self, keep_from: u64) {
        self.offsets = self.offsets.split_off(&keep_from);
        self.forgotten_below = self.forgotten_below.max(keep_from);
        let start = self
            .offsets
            .values()
            .filter(|offset| **offset != OFFSET_NONE)
            .min()
            .copied()
            .unwrap_or(self.durable_end)
            .min(self.durable_end);
        if start <= self.start {
            return;
        }
        self.start = start;
        self.corrupt_runs.retain_mut(|run| {
            run.start = run.start.max(start);
            run.start < run.end
        });
    }

    /// Where a scan of this journal would start.
    pub fn start(&self) -> u64 {
        self.start
    }

    fn read_record(
        &self,
        storage: &mut impl Storage,
        offset: u64,
        header: &RecordHeader,
    ) -> io::Result<Entry> {
        let start = offset + RECORD_HEADER_SIZE as u64;
        let mut body = vec![0u8; header.body_size as usize];
        if start >= self.durable_end && !self.pending.is_empty() {
            let pending_start = (start - self.durable_end) as usize;
            let pending_end = pending_start + body.len();
            body.copy_from_slice(&self.pending[pending_start..pending_end]);
        } else {
            // A body cut short by a crash keeps zeros where bytes are missing: it fails its
            // checksum and is repaired like any corrupt record.
            read_exact_at(storage, Zone::Journal, start, &mut body)?;
        }
        Ok(Entry {
            op: header.op,
            view: header.view,
            parent: header.parent,
            checksum: header.entry_checksum,
            body: Bytes::from(body),
        })
    }

    fn push_record(&mut self, header: &RecordHeader, body: &[u8]) -> u64 {
        let start = self.pending.len();
        self.pending.put_slice(&header.encode());
        self.pending.put_slice(body);
        self.pending
            .resize(start + header.record_size() as usize, 0);
        self.pending_records += 1;
        self.durable_end + start as u64
    }

    /// Buffers an entry; it is durable after the next `flush`.
    pub fn append(&mut self, entry: &Entry) {
        let header = RecordHeader {
            kind: KIND_ENTRY,
            op: entry.op,
            view: entry.view,
            parent: entry.parent,
            entry_checksum: entry.checksum,
            body_size: entry.body.len() as u32,
        };
        let offset = self.push_record(&header, &entry.body);
        self.set_offset(entry.op, offset);
    }

    /// Buffers a record that drops every op above `op`.
    pub fn truncate(&mut self, op: u64) {
        if self.op_max() <= op {
            return;
        }
        let header = RecordHeader {
            kind: KIND_TRUNCATE,
            op: op.max(1),
            view: 0,
            parent: 0,
            entry_checksum: 0,
            body_size: 0,
        };
        assert!(
            op > 0,
            "truncating the whole log never happens: op 0 is the root"
        );
        self.push_record(&header, &[]);
        self.truncate_index(op);
    }

    /// Overwrites, durably, every run of bytes that decoded as no record at open, so
    /// that a later open finds a clean journal. Only for a replica that has learned its log
    /// from the cluster since: what such a run hid no longer matters to it.
    pub fn erase_corrupt_runs(&mut self, storage: &mut impl Storage) -> io::Result<()> {
        if self.corrupt_runs.is_empty() {
            return Ok(());
        }
        for run in std::mem::take(&mut self.corrupt_runs) {
            // Records written since open cover the start of a tail run: zero only past them.
            let start = if run.tail {
                run.start.max(self.end())
            } else {
                run.start
            };
            if start >= run.end {
                continue;
            }
            let mut bytes = vec![0u8; (run.end - start) as usize];
            // Between records, a padding record keeps the stretch from reading as a gap.
            if !run.tail && bytes.len() >= RECORD_HEADER_SIZE {
                let padding = RecordHeader {
                    kind: KIND_PADDING,
                    op: 0,
                    view: 0,
                    parent: 0,
                    entry_checksum: 0,
                    body_size: (bytes.len() - RECORD_HEADER_SIZE) as u32,
                };
                bytes[..RECORD_HEADER_SIZE].copy_from_slice(&padding.encode());
            }
            storage.write_at(Zone::Journal, start, &bytes)?;
        }
        storage.sync(Zone::Journal)
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Writes every buffered record with one write and makes them durable with one sync.
    pub fn flush(&mut self, storage: &mut impl Storage) -> io::Result<FlushStats> {
        let stats = FlushStats {
            records: self.pending_records,
            bytes: self.pending.len() as u64,
        };
        if self.pending.is_empty() {
            return Ok(stats);
        }
        storage.write_at(Zone::Journal, self.durable_end, &self.pending)?;
        storage.sync(Zone::Journal)?;
        self.durable_end += self.pending.len() as u64;
        self.pending.clear();
        self.pending_records = 0;
        Ok(stats)
    }

    pub fn read(
        &self,
        storage: &mut impl Storage,
        op: u64,
    ) -> io::Result<Result<Entry, ReadError>> {
        let offset = match self.offsets.get(&op) {
            Some(offset) if *offset != OFFSET_NONE => *offset,
            _ => return Ok(Err(ReadError::Missing)),
        };
        let mut header_bytes = [0u8; RECORD_HEADER_SIZE];
        if offset >= self.durable_end {
            let start = (offset - self.durable_end) as usize;
            header_bytes.copy_from_slice(&self.pending[start..start + RECORD_HEADER_SIZE]);
        } else {
            read_exact_at(storage, Zone::Journal, offset, &mut header_bytes)?;
        }
        let Some(header) = RecordHeader::decode(&header_bytes).filter(|header| header.op == op)
        else {
            return Ok(Err(ReadError::Corrupt));
        };
        let entry = self.read_record(storage, offset, &header)?;
        Ok(if entry.checksum_valid() {
            Ok(entry)
        } else {
            Err(ReadError::Corrupt)
        })
    }

    /// Highest op with a record (valid or not yet repaired); 0 if none.
    pub fn op_max(&self) -> u64 {
        self.offsets.last_key_value().map_or(0, |(op, _)| *op)
    }

    /// Where the body of `op`'s newest record starts in the journal, if it has a valid one.
    pub fn body_offset(&self, op: u64) -> Option<u64> {
        let offset = *self.offsets.get(&op)?;
        (offset != OFFSET_NONE).then_some(offset + RECORD_HEADER_SIZE as u64)
    }

    /// Lowest op with a record, or if none, the lowest it may hold (0 for a journal that
    /// never forgot anything).
    pub fn op_min(&self) -> u64 {
        self.offsets
            .first_key_value()
            .map_or(self.forgotten_below, |(op, _)| *op)
    }

    pub fn entry_count(&self) -> u64 {
        self.offsets
            .values()
            .filter(|offset| **offset != OFFSET_NONE)
            .count() as u64
    }

    /// Bytes the journal holds: from the scan start to the end of the last record.
    pub fn size_bytes(&self) -> u64 {
        self.end() - self.start
    }

    /// Where the next record goes.
    fn end(&self) -> u64 {
        self.durable_end + self.pending.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulator::MemoryStorage;

    fn chain(count: u64) -> Vec<Entry> {
        let mut parent = 0;
        (1..=count)
            .map(|op| {
                let entry = Entry::new(op, 0, parent, Bytes::from(vec![op as u8; 8 * op as usize]));
                parent = entry.checksum;
                entry
            })
            .collect()
    }

    fn reopen(storage: &mut MemoryStorage) -> (Journal, JournalScan) {
        Journal::open(storage, 0).unwrap()
    }

    #[test]
    fn entries_survive_reopen_and_truncate_applies() {
        let mut storage = MemoryStorage::default();
        let (mut journal, _) = reopen(&mut storage);
        let entries = chain(5);
        for entry in &entries {
            journal.append(entry);
        }
        assert_eq!(
            journal.read(&mut storage, 3).unwrap(),
            Ok(entries[2].clone())
        );
        journal.flush(&mut storage).unwrap();
        journal.truncate(3);
        journal.flush(&mut storage).unwrap();
        let (journal, scan) = reopen(&mut storage);
        assert_eq!(scan, JournalScan::default());
        assert_eq!(journal.op_max(), 3);
        for entry in &entries[..3] {
            assert_eq!(
                journal.read(&mut storage, entry.op).unwrap(),
                Ok(entry.clone())
            );
        }
        assert_eq!(
            journal.read(&mut storage, 4).unwrap(),
            Err(ReadError::Missing)
        );
    }

    #[test]
    fn ops_a_checkpoint_covers_are_forgotten_and_the_scan_starts_after_them() {
        let mut storage = MemoryStorage::default();
        let (mut journal, _) = reopen(&mut storage);
        let entries = chain(10);
        for entry in &entries[..8] {
            journal.append(entry);
        }
        journal.flush(&mut storage).unwrap();
        // A repair rewrote op 7 after op 8: op 6's record is the oldest kept.
        journal.append(&entries[6]);
        journal.append(&entries[8]);
        journal.append(&entries[9]);
        journal.flush(&mut storage).unwrap();
        let sixth = journal.offsets[&6];
        journal.discard_before(6);
        assert_eq!(
            (journal.op_min(), journal.op_max(), journal.start()),
            (6, 10, sixth)
        );
        storage.discard(Zone::Journal, journal.start()).unwrap();
        let (journal, scan) = Journal::open(&mut storage, sixth).unwrap();
        assert_eq!(
            scan,
            JournalScan::default(),
            "nothing before the start is scanned"
        );
        assert_eq!((journal.op_min(), journal.op_max()), (6, 10));
        for entry in &entries[5..] {
            assert_eq!(
                journal.read(&mut storage, entry.op).unwrap(),
                Ok(entry.clone())
            );
        }
        assert_eq!(
            journal.read(&mut storage, 5).unwrap(),
            Err(ReadError::Missing)
        );
    }

    #[test]
    fn a_segment_left_short_by_a_crash_reads_as_no_records() {
        use crate::storage::{FileStorage, JOURNAL_SEGMENT_BYTES};
        let directory = std::env::temp_dir().join(format!("vsr-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&directory);
        let mut storage = FileStorage::create(&directory).unwrap();
        // Records from just before a segment boundary: the third one crosses it.
        let start = JOURNAL_SEGMENT_BYTES - 200;
        let (mut journal, _) = Journal::open(&mut storage, start).unwrap();
        let entries = chain(4);
        for entry in &entries {
            journal.append(entry);
        }
        journal.flush(&mut storage).unwrap();
        // Power failed before segment 0's tail reached the disk; segment 1 exists, empty.
        let first_segment = directory.join(FileStorage::journal_segment_file(0));
        let kept = start + journal.offsets[&2] - start;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&first_segment)
            .unwrap()
            .set_len(kept)
            .unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(directory.join(FileStorage::journal_segment_file(1)))
            .unwrap()
            .set_len(0)
            .unwrap();
        let mut storage = FileStorage::open(&directory).unwrap();
        let (journal, _) = Journal::open(&mut storage, start).unwrap();
        assert_eq!(journal.op_max(), 1, "only the record before the lost tail");
        assert_eq!(
            journal.read(&mut storage, 1).unwrap(),
            Ok(entries[0].clone())
        );
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[test]
    fn unflushed_records_are_lost_on_crash_and_torn_tail_is_ignored() {
        let mut storage = MemoryStorage::default();
        let (mut journal, _) = reopen(&mut storage);
        let entries = chain(4);
        journal.append(&entries[0]);
        journal.flush(&mut storage).unwrap();
        journal.append(&entries[1]);
        let pending = journal.pending.clone();
        storage
            .write_at(
                Zone::Journal,
                journal.durable_end,
                &pending[..pending.len() / 2],
            )
            .unwrap();
        storage.crash_keep_torn_writes();
        let (mut journal, scan) = reopen(&mut storage);
        assert_eq!(journal.op_max(), 1);
        assert_eq!(scan.corrupt_ops, BTreeSet::new());
        journal.append(&entries[1]);
        journal.flush(&mut storage).unwrap();
        let (journal, _) = reopen(&mut storage);
        assert_eq!(
            journal.read(&mut storage, 2).unwrap(),
            Ok(entries[1].clone())
        );
    }

    #[test]
    fn a_hole_between_records_is_corruption_and_an_erased_run_is_not() {
        let entries = chain(6);
        let mut storage = MemoryStorage::default();
        let (mut journal, _) = reopen(&mut storage);
        for entry in &entries {
            journal.append(entry);
        }
        journal.flush(&mut storage).unwrap();
        let third = journal.offsets[&3];
        let fourth = journal.offsets[&4];
        // A page that never reached the disk: zeros where op 3's record was.
        storage
            .write_at(Zone::Journal, third, &vec![0u8; (fourth - third) as usize])
            .unwrap();
        storage.sync(Zone::Journal).unwrap();
        let (mut journal, scan) = reopen(&mut storage);
        assert_eq!(scan.corrupt_headers, 1, "a zero hole hides a record");
        journal.erase_corrupt_runs(&mut storage).unwrap();
        let (_, scan) = reopen(&mut storage);
        assert_eq!(scan, JournalScan::default(), "the erased run reads clean");
        // Corruption right after the erased run is still seen.
        storage.corrupt_byte(Zone::Journal, fourth + 20);
        let (_, scan) = reopen(&mut storage);
        assert_eq!(scan.corrupt_headers, 1);
    }

    #[test]
    fn corruption_anywhere_is_detected_and_local() {
        let entries = chain(6);
        let mut clean = MemoryStorage::default();
        let (mut journal, _) = reopen(&mut clean);
        for entry in &entries {
            journal.append(entry);
        }
        journal.flush(&mut clean).unwrap();
        let size = clean.size(Zone::Journal).unwrap();
        for byte in 0..size {
            let mut storage = clean.clone();
            storage.corrupt_byte(Zone::Journal, byte);
            let (journal, scan) = reopen(&mut storage);
            let lost: Vec<u64> = entries
                .iter()
                .filter(|entry| {
                    journal.read(&mut storage, entry.op).unwrap() != Ok((*entry).clone())
                })
                .map(|entry| entry.op)
                .collect();
            assert_eq!(lost.len(), 1, "byte {byte}: lost {lost:?}");
            let reported = scan.corrupt_ops.contains(&lost[0]) || scan.corrupt_headers > 0;
            assert!(
                reported,
                "byte {byte}: corruption of op {} not reported",
                lost[0]
            );
        }
    }
}
