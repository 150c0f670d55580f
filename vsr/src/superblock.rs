//! The superblock: the replica's durable view and commit state, in several checksummed copies.
//!
//! Each write goes to the next copy in rotation with a higher sequence number and is synced
//! before the replica acts on it, so a torn write damages at most the copy being written and the
//! newest intact copy is never older than the last completed write.

use std::io;

use thiserror::Error;

use crate::checkpoint::CheckpointId;
use crate::checksum::checksum;
use crate::storage::{Storage, Zone, read_exact_at};

pub const COPIES: u64 = 4;
const COPY_SIZE: u64 = 4096;
const ENCODED_SIZE: usize = 8 + 8 * 12 + 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SuperblockState {
    pub cluster: u64,
    pub replica: u8,
    pub replica_count: u8,
    pub view: u64,
    /// The last view in which this replica had normal status.
    pub log_view: u64,
    /// Every op up to here is committed and durable in the journal.
    pub commit: u64,
    /// The checksum of op `commit`'s entry (0 for op 0): anchors the replay of the journal, so
    /// an older record of an op can never be mistaken for its committed one.
    pub commit_checksum: u64,
    pub sequence: u64,
    /// Formatted as a replacement for a replica that lost its data: it must not vote until
    /// the cluster has told it the current view and log (the recovery protocol).
    pub recovering: bool,
    /// The newest durable checkpoint: a restart starts from it and replays the ops after it.
    pub checkpoint: CheckpointId,
    /// Where the journal's scan starts: every record before it is covered by `checkpoint`.
    pub journal_start: u64,
}

#[derive(Debug, Error)]
pub enum SuperblockError {
    #[error("not formatted (no superblock): create it with `vsr-replica format`")]
    Unformatted,
    #[error("superblock: every copy fails its checksum; the data directory is unusable")]
    AllCopiesCorrupt,
    #[error(
        "superblock belongs to cluster {found_cluster} replica {found_replica} of {found_count}, \
         not cluster {cluster} replica {replica} of {count}; wrong data directory?"
    )]
    WrongIdentity {
        cluster: u64,
        replica: u8,
        count: u8,
        found_cluster: u64,
        found_replica: u8,
        found_count: u8,
    },
    #[error("superblock: {0}")]
    Io(#[from] io::Error),
}

/// The result of opening: the state, and how many copies were damaged (each one a checksum
/// failure to report).
#[derive(Debug)]
pub struct SuperblockOpen {
    pub state: SuperblockState,
    pub corrupt_copies: u64,
}

impl SuperblockState {
    fn encode(&self) -> [u8; ENCODED_SIZE] {
        let mut out = [0u8; ENCODED_SIZE];
        for (index, value) in [
            self.cluster,
            self.view,
            self.log_view,
            self.commit,
            self.sequence,
            self.commit_checksum,
            self.checkpoint.op,
            self.checkpoint.entry_checksum,
            self.checkpoint.state_checksum,
            self.checkpoint.size_bytes,
            self.journal_start,
        ]
        .into_iter()
        .enumerate()
        {
            out[16 + index * 8..24 + index * 8].copy_from_slice(&value.to_le_bytes());
        }
        out[104] = self.replica;
        out[105] = self.replica_count;
        out[106] = self.recovering as u8;
        out[107] = self.checkpoint.slot;
        let sum = checksum(&out[8..]);
        out[0..8].copy_from_slice(&sum.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8; ENCODED_SIZE]) -> Option<SuperblockState> {
        let u64_at = |start: usize| u64::from_le_bytes(bytes[start..start + 8].try_into().unwrap());
        (u64_at(0) == checksum(&bytes[8..])).then(|| SuperblockState {
            cluster: u64_at(16),
            view: u64_at(24),
            log_view: u64_at(32),
            commit: u64_at(40),
            sequence: u64_at(48),
            commit_checksum: u64_at(56),
            checkpoint: CheckpointId {
                op: u64_at(64),
                entry_checksum: u64_at(72),
                state_checksum: u64_at(80),
                size_bytes: u64_at(88),
                slot: bytes[107],
            },
            journal_start: u64_at(96),
            replica: bytes[104],
            replica_count: bytes[105],
            recovering: bytes[106] == 1,
        })
    }
}

/// Writes every copy of a new replica's superblock: view 0, nothing committed.
pub fn format(
    storage: &mut impl Storage,
    cluster: u64,
    replica: u8,
    replica_count: u8,
    recovering: bool,
) -> io::Result<SuperblockState> {
    let mut state = SuperblockState {
        cluster,
        replica,
        replica_count,
        view: 0,
        log_view: 0,
        commit: 0,
        commit_checksum: 0,
        sequence: 0,
        recovering,
        checkpoint: CheckpointId::default(),
        journal_start: 0,
    };
    for _ in 0..COPIES {
        write(storage, &mut state)?;
    }
    Ok(state)
}

/// Opens the newest intact copy of a formatted superblock.
pub fn open(
    storage: &mut impl Storage,
    cluster: u64,
    replica: u8,
    replica_count: u8,
) -> Result<SuperblockOpen, SuperblockError> {
    if storage.size(Zone::Superblock)? == 0 {
        return Err(SuperblockError::Unformatted);
    }
    let mut newest: Option<SuperblockState> = None;
    let mut corrupt_copies = 0;
    for copy in 0..COPIES {
        let mut bytes = [0u8; ENCODED_SIZE];
        let complete = read_exact_at(storage, Zone::Superblock, copy * COPY_SIZE, &mut bytes)?;
        match SuperblockState::decode(&bytes).filter(|_| complete) {
            Some(state) if newest.is_none_or(|newest| state.sequence > newest.sequence) => {
                newest = Some(state)
            }
            Some(_) => {}
            None => corrupt_copies += 1,
        }
    }
    let state = newest.ok_or(SuperblockError::AllCopiesCorrupt)?;
    if (state.cluster, state.replica, state.replica_count) != (cluster, replica, replica_count) {
        return Err(SuperblockError::WrongIdentity {
            cluster,
            replica,
            count: replica_count,
            found_cluster: state.cluster,
            found_replica: state.replica,
            found_count: state.replica_count,
        });
    }
    Ok(SuperblockOpen {
        state,
        corrupt_copies,
    })
}

/// Durably writes `state` as the next copy; bumps its sequence.
pub fn write(storage: &mut impl Storage, state: &mut SuperblockState) -> io::Result<()> {
    state.sequence += 1;
    let copy = state.sequence % COPIES;
    storage.write_at(Zone::Superblock, copy * COPY_SIZE, &state.encode())?;
    storage.sync(Zone::Superblock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulator::MemoryStorage;

    #[test]
    fn newest_intact_copy_wins_after_torn_write() {
        let mut storage = MemoryStorage::default();
        let mut state = format(&mut storage, 1, 0, 3, false).unwrap();
        state.view = 5;
        state.commit = 10;
        write(&mut storage, &mut state).unwrap();
        let last_complete = state;
        state.view = 6;
        state.sequence += 1;
        let copy = state.sequence % COPIES;
        let encoded = state.encode();
        storage
            .write_at(Zone::Superblock, copy * COPY_SIZE, &encoded[..20])
            .unwrap();
        storage.sync(Zone::Superblock).unwrap();
        let opened = open(&mut storage, 1, 0, 3).unwrap();
        assert_eq!(opened.state, last_complete);
        assert_eq!(opened.corrupt_copies, 1);
    }

    #[test]
    fn unformatted_identity_mismatch_and_total_corruption_are_errors() {
        let mut storage = MemoryStorage::default();
        assert!(matches!(
            open(&mut storage, 1, 0, 3),
            Err(SuperblockError::Unformatted)
        ));
        let formatted = format(&mut storage, 1, 0, 3, true).unwrap();
        assert_eq!(open(&mut storage, 1, 0, 3).unwrap().state, formatted);
        assert!(matches!(
            open(&mut storage, 2, 0, 3),
            Err(SuperblockError::WrongIdentity { .. })
        ));
        for copy in 0..COPIES {
            storage.corrupt_byte(Zone::Superblock, copy * COPY_SIZE + 20);
        }
        assert!(matches!(
            open(&mut storage, 1, 0, 3),
            Err(SuperblockError::AllCopiesCorrupt)
        ));
    }
}
