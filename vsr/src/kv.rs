//! The replicated state machine: a key-value store. Deterministic, so every replica that
//! executes the same committed ops in the same order holds the same map.

use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};
use vsr_probes::RejectReason;

use crate::message::Reader;

pub const KEY_SIZE_MAX: usize = 256;
pub const VALUE_SIZE_MAX: usize = 64 * 1024;
/// The largest valid operation: a put of the largest key and value.
pub const OPERATION_SIZE_MAX: usize = 3 + KEY_SIZE_MAX + VALUE_SIZE_MAX;
/// The largest encoded result: a value.
pub const RESULT_SIZE_MAX: usize = 1 + VALUE_SIZE_MAX;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    Put { key: Bytes, value: Bytes },
    Get { key: Bytes },
    Delete { key: Bytes },
}

const KIND_PUT: u8 = 1;
const KIND_GET: u8 = 2;
const KIND_DELETE: u8 = 3;

/// What an operation returned. `Invalid` is the one failure: an operation no valid client
/// sends, rejected deterministically by every replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperationResult {
    /// Put: the previous value, if any. Get: the value. Delete: the removed value.
    Value(Option<Bytes>),
    Invalid,
}

impl Operation {
    pub fn encode(&self) -> Bytes {
        let (kind, key, value) = match self {
            Operation::Put { key, value } => (KIND_PUT, key, value.as_ref()),
            Operation::Get { key } => (KIND_GET, key, &[][..]),
            Operation::Delete { key } => (KIND_DELETE, key, &[][..]),
        };
        let mut out = BytesMut::with_capacity(3 + key.len() + value.len());
        out.put_u8(kind);
        out.put_u16_le(key.len() as u16);
        out.put_slice(key);
        out.put_slice(value);
        out.freeze()
    }

    pub fn decode(bytes: &Bytes) -> Option<Operation> {
        let kind = *bytes.first()?;
        let key_size = u16::from_le_bytes(bytes.get(1..3)?.try_into().ok()?) as usize;
        if key_size > KEY_SIZE_MAX || bytes.len() < 3 + key_size {
            return None;
        }
        let key = bytes.slice(3..3 + key_size);
        let rest = bytes.slice(3 + key_size..);
        match kind {
            KIND_PUT if rest.len() <= VALUE_SIZE_MAX => Some(Operation::Put { key, value: rest }),
            KIND_GET if rest.is_empty() => Some(Operation::Get { key }),
            KIND_DELETE if rest.is_empty() => Some(Operation::Delete { key }),
            _ => None,
        }
    }
}

impl OperationResult {
    pub fn encode(&self) -> Bytes {
        match self {
            OperationResult::Value(None) => Bytes::from_static(&[0]),
            OperationResult::Value(Some(value)) => {
                let mut out = BytesMut::with_capacity(1 + value.len());
                out.put_u8(1);
                out.put_slice(value);
                out.freeze()
            }
            OperationResult::Invalid => Bytes::from_static(&[2]),
        }
    }

    pub fn decode(bytes: &Bytes) -> Option<OperationResult> {
        match bytes.first()? {
            0 if bytes.len() == 1 => Some(OperationResult::Value(None)),
            1 => Some(OperationResult::Value(Some(bytes.slice(1..)))),
            2 if bytes.len() == 1 => Some(OperationResult::Invalid),
            _ => None,
        }
    }
}

#[derive(Debug, Default)]
pub struct KvStore {
    map: HashMap<Bytes, Bytes>,
}

impl KvStore {
    pub fn execute(&mut self, operation: &Bytes) -> OperationResult {
        match Operation::decode(operation) {
            Some(Operation::Put { key, value }) => {
                OperationResult::Value(self.map.insert(key, value))
            }
            Some(Operation::Get { key }) => OperationResult::Value(self.map.get(&key).cloned()),
            Some(Operation::Delete { key }) => OperationResult::Value(self.map.remove(&key)),
            None => OperationResult::Invalid,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Appends the map in key order: equal maps encode to equal bytes on every replica, so a
    /// checkpoint's checksum identifies the state.
    pub fn encode_into(&self, out: &mut BytesMut) {
        let mut pairs: Vec<(&Bytes, &Bytes)> = self.map.iter().collect();
        pairs.sort_unstable();
        out.put_u64_le(pairs.len() as u64);
        for (key, value) in pairs {
            out.put_u16_le(key.len() as u16);
            out.put_u32_le(value.len() as u32);
            out.put_slice(key);
            out.put_slice(value);
        }
    }

    pub fn decode_from(reader: &mut Reader) -> Result<KvStore, RejectReason> {
        let count = reader.u64()?;
        let mut map = HashMap::new();
        for _ in 0..count {
            let key_size = usize::from(reader.u16()?);
            let value_size = reader.u32()? as usize;
            if key_size > KEY_SIZE_MAX || value_size > VALUE_SIZE_MAX {
                return Err(RejectReason::InvalidFields);
            }
            let key = reader.bytes(key_size)?;
            let value = reader.bytes(value_size)?;
            if map.insert(key, value).is_some() {
                return Err(RejectReason::InvalidFields);
            }
        }
        Ok(KvStore { map })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &'static str) -> Bytes {
        Bytes::from_static(text.as_bytes())
    }

    #[test]
    fn put_get_delete() {
        let mut store = KvStore::default();
        let put = Operation::Put {
            key: key("k"),
            value: key("v1"),
        }
        .encode();
        assert_eq!(store.execute(&put), OperationResult::Value(None));
        let put = Operation::Put {
            key: key("k"),
            value: key("v2"),
        }
        .encode();
        assert_eq!(store.execute(&put), OperationResult::Value(Some(key("v1"))));
        let get = Operation::Get { key: key("k") }.encode();
        assert_eq!(store.execute(&get), OperationResult::Value(Some(key("v2"))));
        let delete = Operation::Delete { key: key("k") }.encode();
        assert_eq!(
            store.execute(&delete),
            OperationResult::Value(Some(key("v2")))
        );
        assert_eq!(store.execute(&get), OperationResult::Value(None));
    }

    #[test]
    fn malformed_operations_are_invalid_not_panics() {
        let mut store = KvStore::default();
        for bytes in [&b""[..], &[9], &[1, 255, 255], &[2, 1, 0, b'k', b'x']] {
            assert_eq!(
                store.execute(&Bytes::copy_from_slice(bytes)),
                OperationResult::Invalid
            );
        }
        assert!(store.is_empty());
    }

    #[test]
    fn encoding_is_canonical_and_round_trips() {
        let mut forward = KvStore::default();
        let mut backward = KvStore::default();
        let keys = ["a", "b", "c", "d"];
        for key_text in keys {
            let put = Operation::Put {
                key: key(key_text),
                value: key("value"),
            }
            .encode();
            forward.execute(&put);
        }
        for key_text in keys.iter().rev() {
            let put = Operation::Put {
                key: key(key_text),
                value: key("value"),
            }
            .encode();
            backward.execute(&put);
        }
        let (mut one, mut two) = (BytesMut::new(), BytesMut::new());
        forward.encode_into(&mut one);
        backward.encode_into(&mut two);
        assert_eq!(one, two, "insertion order does not show");
        let encoded = one.freeze();
        let mut reader = Reader::new(&encoded);
        let decoded = KvStore::decode_from(&mut reader).unwrap();
        reader.finish().unwrap();
        assert_eq!(decoded.map, forward.map);
        let truncated = encoded.slice(..encoded.len() - 1);
        assert!(KvStore::decode_from(&mut Reader::new(&truncated)).is_err());
    }

    #[test]
    fn results_round_trip() {
        for result in [
            OperationResult::Value(None),
            OperationResult::Value(Some(key("value"))),
            OperationResult::Invalid,
        ] {
            assert_eq!(OperationResult::decode(&result.encode()), Some(result));
        }
    }
}
