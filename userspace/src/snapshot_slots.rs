//! Reading the kernel's snapshot slots without mixing two snapshots. The eBPF program writes a
//! slot in place while this may be copying it out; the slot's `sequence` is a seqlock (see
//! `vsrscope_common::SnapshotSlot`). A lookup copies the value with a plain `memcpy` in no
//! guaranteed order, so the sequence read inside one copy says nothing about the rest of it:
//! it is read by one lookup before and one after the copy that is kept.

use aya::maps::{Array, MapData};
use vsrscope_common::SnapshotSlot;

use crate::attach::AttachError;

/// A writer holds a slot for well under a microsecond every snapshot interval, so a few
/// attempts always find it still; one that keeps failing means something else is wrong.
const ATTEMPTS: usize = 64;

/// Replica `replica`'s slot as one writer left it; `None` if nothing was ever published.
pub fn read(
    slots: &Array<&MapData, SnapshotSlot>,
    replica: u32,
) -> Result<Option<SnapshotSlot>, AttachError> {
    let get = || {
        slots
            .get(&replica, 0)
            .map_err(|error| AttachError::Load(format!("reading snapshot slot {replica}: {error}")))
    };
    for _attempt in 0..ATTEMPTS {
        let before = get()?.sequence;
        let slot = get()?;
        let after = get()?.sequence;
        if before % 2 == 0 && before == after && slot.sequence == before {
            return Ok((slot.sequence > 0).then_some(slot));
        }
    }
    Err(AttachError::Load(format!(
        "snapshot slot {replica} was being written at each of {ATTEMPTS} reads"
    )))
}
