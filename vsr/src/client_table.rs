//! Client sessions: the latest request number and reply per client, bounded in size.
//!
//! Updated only when a committed op executes, in op order, so every replica evicts the same
//! sessions at the same point and a request is executed at most once cluster-wide.

use std::collections::{BTreeMap, HashMap};

use bytes::{BufMut, Bytes, BytesMut};
use vsr_probes::RejectReason;

use crate::kv::RESULT_SIZE_MAX;
use crate::message::Reader;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub request_number: u64,
    pub reply: Bytes,
    /// The op that executed `request_number`.
    pub op: u64,
    /// Recency for eviction: the commit sequence number of the last execution.
    last_used: u64,
}

/// What the table says about a request arriving or executing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// A new request from a live session, or the registration (number 1) of a new client.
    New,
    /// Already executed: here is the reply.
    Executed(&'a Session),
    /// Older than the session's latest request: the client has moved on; drop it.
    Stale,
    /// The client is unknown and did not start at request 1: its session was evicted.
    Evicted,
}

#[derive(Debug)]
pub struct ClientTable {
    sessions: HashMap<u64, Session>,
    by_recency: BTreeMap<u64, u64>,
    capacity: usize,
    sequence: u64,
}

impl ClientTable {
    pub fn new(capacity: usize) -> ClientTable {
        assert!(capacity > 0);
        ClientTable {
            sessions: HashMap::new(),
            by_recency: BTreeMap::new(),
            capacity,
            sequence: 0,
        }
    }

    pub fn lookup(&self, client_id: u64, request_number: u64) -> Lookup<'_> {
        match self.sessions.get(&client_id) {
            None if request_number == 1 => Lookup::New,
            None => Lookup::Evicted,
            Some(session) if request_number == session.request_number => Lookup::Executed(session),
            Some(session) if request_number < session.request_number => Lookup::Stale,
            Some(_) => Lookup::New,
        }
    }

    /// Records an executed request; returns the client evicted to make room, if any.
    pub fn record(
        &mut self,
        client_id: u64,
        request_number: u64,
        op: u64,
        reply: Bytes,
    ) -> Option<u64> {
        self.sequence += 1;
        let session = Session {
            request_number,
            reply,
            op,
            last_used: self.sequence,
        };
        if let Some(previous) = self.sessions.insert(client_id, session) {
            assert!(previous.request_number < request_number);
            self.by_recency.remove(&previous.last_used);
            self.by_recency.insert(self.sequence, client_id);
            return None;
        }
        self.by_recency.insert(self.sequence, client_id);
        if self.sessions.len() <= self.capacity {
            return None;
        }
        let (_, evicted) = self.by_recency.pop_first().unwrap();
        self.sessions.remove(&evicted);
        assert_eq!(self.sessions.len(), self.capacity);
        Some(evicted)
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Appends the sessions, least recently used first: equal tables encode to equal bytes,
    /// and a decoded table evicts in the same order as the one encoded.
    pub fn encode_into(&self, out: &mut BytesMut) {
        out.put_u64_le(self.sequence);
        out.put_u64_le(self.by_recency.len() as u64);
        for (last_used, client_id) in &self.by_recency {
            let session = &self.sessions[client_id];
            out.put_u64_le(*client_id);
            out.put_u64_le(session.request_number);
            out.put_u64_le(session.op);
            out.put_u64_le(*last_used);
            out.put_u32_le(session.reply.len() as u32);
            out.put_slice(&session.reply);
        }
    }

    pub fn decode_from(reader: &mut Reader, capacity: usize) -> Result<ClientTable, RejectReason> {
        let mut table = ClientTable::new(capacity);
        table.sequence = reader.u64()?;
        let count = reader.u64()?;
        if count > capacity as u64 {
            return Err(RejectReason::InvalidFields);
        }
        for _ in 0..count {
            let client_id = reader.u64()?;
            let request_number = reader.u64()?;
            let op = reader.u64()?;
            let last_used = reader.u64()?;
            let reply_size = reader.u32()? as usize;
            if reply_size > RESULT_SIZE_MAX || last_used > table.sequence {
                return Err(RejectReason::InvalidFields);
            }
            let reply = reader.bytes(reply_size)?;
            let session = Session {
                request_number,
                reply,
                op,
                last_used,
            };
            let duplicate = table.sessions.insert(client_id, session).is_some()
                || table.by_recency.insert(last_used, client_id).is_some();
            if duplicate {
                return Err(RejectReason::InvalidFields);
            }
        }
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_get_the_stored_reply() {
        let mut table = ClientTable::new(4);
        assert_eq!(table.lookup(1, 1), Lookup::New);
        table.record(1, 1, 10, Bytes::from_static(b"r1"));
        match table.lookup(1, 1) {
            Lookup::Executed(session) => {
                assert_eq!((session.op, &session.reply[..]), (10, &b"r1"[..]))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(table.lookup(1, 2), Lookup::New);
        table.record(1, 2, 11, Bytes::new());
        assert_eq!(table.lookup(1, 1), Lookup::Stale);
    }

    #[test]
    fn a_decoded_table_answers_and_evicts_like_the_original() {
        let mut table = ClientTable::new(3);
        table.record(1, 1, 1, Bytes::from_static(b"one"));
        table.record(2, 1, 2, Bytes::new());
        table.record(1, 2, 3, Bytes::from_static(b"two"));
        let mut encoded = BytesMut::new();
        table.encode_into(&mut encoded);
        let encoded = encoded.freeze();
        let mut reader = Reader::new(&encoded);
        let mut decoded = ClientTable::decode_from(&mut reader, 3).unwrap();
        reader.finish().unwrap();
        assert_eq!(decoded.lookup(1, 1), Lookup::Stale);
        assert!(
            matches!(decoded.lookup(1, 2), Lookup::Executed(session) if &session.reply[..] == b"two")
        );
        assert_eq!(decoded.record(3, 1, 4, Bytes::new()), None);
        assert_eq!(
            decoded.record(4, 1, 5, Bytes::new()),
            Some(2),
            "client 2 was least recently used"
        );
        assert!(
            ClientTable::decode_from(&mut Reader::new(&encoded), 1).is_err(),
            "more sessions than fit"
        );
    }

    #[test]
    fn full_table_evicts_least_recently_used() {
        let mut table = ClientTable::new(2);
        assert_eq!(table.record(1, 1, 1, Bytes::new()), None);
        assert_eq!(table.record(2, 1, 2, Bytes::new()), None);
        assert_eq!(table.record(1, 2, 3, Bytes::new()), None);
        assert_eq!(table.record(3, 1, 4, Bytes::new()), Some(2));
        assert_eq!(table.lookup(2, 2), Lookup::Evicted);
        assert_eq!(table.len(), 2);
    }
}
