//! Checkpoints: the state machine (key-value store and client table) as it stood after one op,
//! encoded canonically and identified by its checksum. A replica writes one every
//! `checkpoint_interval_ops` committed ops into the checkpoint slot its superblock does not
//! reference, syncs it, and only then records it in the superblock; a restart loads the newest
//! recorded checkpoint and replays only the ops after it.

use std::io;

use bytes::{Bytes, BytesMut};

use crate::checksum::checksum;
use crate::client_table::ClientTable;
use crate::kv::KvStore;
use crate::message::Reader;
use crate::storage::{CHECKPOINT_SLOTS, Storage, Zone, read_exact_at};

/// What the superblock records of a checkpoint: enough to find it, check it, and chain the ops
/// after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CheckpointId {
    /// The last op whose execution the state includes; 0: none (the empty state).
    pub op: u64,
    /// The checksum of op `op`'s entry: the parent of op `op + 1`.
    pub entry_checksum: u64,
    /// The checksum of the encoded state: the same on every replica at this op.
    pub state_checksum: u64,
    pub size_bytes: u64,
    pub slot: u8,
}

impl CheckpointId {
    /// The slot the next checkpoint goes to: never the one this one occupies.
    pub fn next_slot(&self) -> u8 {
        if self.op == 0 {
            0
        } else {
            (self.slot + 1) % CHECKPOINT_SLOTS
        }
    }
}

/// The state machine after some op, encoded: equal states encode to equal bytes.
pub fn encode_state(kv: &KvStore, client_table: &ClientTable) -> Bytes {
    let mut out = BytesMut::new();
    kv.encode_into(&mut out);
    client_table.encode_into(&mut out);
    out.freeze()
}

/// `None` for bytes that no `encode_state` wrote (a checksum collision or a bug, never a
/// crash: a checkpoint is checked against its checksum first).
pub fn decode_state(state: &Bytes, sessions_max: usize) -> Option<(KvStore, ClientTable)> {
    let mut reader = Reader::new(state);
    let kv = KvStore::decode_from(&mut reader).ok()?;
    let client_table = ClientTable::decode_from(&mut reader, sessions_max).ok()?;
    reader.finish().ok()?;
    Some((kv, client_table))
}

/// Writes `state` durably into `slot`.
pub fn write(storage: &mut impl Storage, slot: u8, state: &[u8]) -> io::Result<()> {
    assert!(slot < CHECKPOINT_SLOTS);
    storage.write_at(Zone::Checkpoint(slot), 0, state)?;
    storage.sync(Zone::Checkpoint(slot))
}

/// Reads the checkpoint `id` names; `None` if its bytes are short or fail their checksum.
pub fn read(storage: &mut impl Storage, id: &CheckpointId) -> io::Result<Option<Bytes>> {
    assert!(id.op > 0 && id.slot < CHECKPOINT_SLOTS);
    let Ok(size) = usize::try_from(id.size_bytes) else {
        return Ok(None);
    };
    let mut state = vec![0u8; size];
    let complete = read_exact_at(storage, Zone::Checkpoint(id.slot), 0, &mut state)?;
    Ok((complete && checksum(&state) == id.state_checksum).then(|| Bytes::from(state)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::Operation;
    use crate::simulator::MemoryStorage;

    #[test]
    fn a_written_checkpoint_reads_back_and_a_damaged_one_does_not() {
        let mut kv = KvStore::default();
        kv.execute(
            &Operation::Put {
                key: Bytes::from_static(b"key"),
                value: Bytes::from_static(b"value"),
            }
            .encode(),
        );
        let mut client_table = ClientTable::new(4);
        client_table.record(7, 1, 1, Bytes::new());
        let state = encode_state(&kv, &client_table);
        let id = CheckpointId {
            op: 9,
            entry_checksum: 1,
            state_checksum: checksum(&state),
            size_bytes: state.len() as u64,
            slot: 1,
        };
        let mut storage = MemoryStorage::default();
        write(&mut storage, id.slot, &state).unwrap();
        let read_back = read(&mut storage, &id).unwrap().unwrap();
        let (kv_back, table_back) = decode_state(&read_back, 4).unwrap();
        assert_eq!(encode_state(&kv_back, &table_back), state);
        storage.corrupt_byte(Zone::Checkpoint(1), 3);
        assert_eq!(read(&mut storage, &id).unwrap(), None);
        let other_slot = CheckpointId { slot: 0, ..id };
        assert_eq!(read(&mut storage, &other_slot).unwrap(), None, "empty slot");
        assert_eq!(id.next_slot(), 0);
        assert_eq!(CheckpointId::default().next_slot(), 0);
    }
}
