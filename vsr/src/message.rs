//! The wire format: a fixed 96-byte header with its own checksum, then a body with another.
//!
//! The header checksum is verified before any other field is trusted, so a corrupted `size`
//! cannot make a reader allocate or skip garbage; the body checksum is verified before the body
//! is parsed. Every check that fails maps to one `RejectReason`, which the replica counts.

use bytes::{BufMut, Bytes, BytesMut};
use vsr_probes::{Command, RejectReason};

use crate::checksum::{checksum, checksum_parts};

pub const HEADER_SIZE: usize = 96;
pub const PROTOCOL_VERSION: u16 = 1;
/// Bounds every allocation a peer can cause.
pub const MESSAGE_SIZE_MAX: usize = 16 * 1024 * 1024;
/// The `replica` field of messages sent by clients.
pub const SENDER_CLIENT: u8 = u8::MAX;
/// A client's first request registers its session and carries no operation.
pub const REGISTER_REQUEST_NUMBER: u64 = 1;

/// Status of a `Reply`, carried in the header's `aux` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ReplyStatus {
    Ok = 0,
    /// The replica is not the primary; `view` tells the client who is.
    NotPrimary = 1,
    /// The client's session was evicted (or never registered): it must start a new session.
    SessionEvicted = 2,
    /// The request's operation is larger than the cluster accepts (`Config::request_bytes_max`);
    /// it was not executed and never will be.
    TooLarge = 3,
}

impl ReplyStatus {
    pub fn from_u64(value: u64) -> Option<Self> {
        match value {
            0 => Some(ReplyStatus::Ok),
            1 => Some(ReplyStatus::NotPrimary),
            2 => Some(ReplyStatus::SessionEvicted),
            3 => Some(ReplyStatus::TooLarge),
            _ => None,
        }
    }
}

/// Header fields. Their meaning depends on `command`; see each constructor in `replica.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub checksum_body: u64,
    pub cluster: u64,
    pub size: u32,
    pub command: Command,
    pub replica: u8,
    pub view: u64,
    pub op: u64,
    pub commit: u64,
    pub client_id: u64,
    pub request_number: u64,
    pub context: u64,
    pub parent: u64,
    pub aux: u64,
}

impl Header {
    pub fn new(command: Command, cluster: u64, replica: u8) -> Header {
        Header {
            checksum_body: 0,
            cluster,
            size: HEADER_SIZE as u32,
            command,
            replica,
            view: 0,
            op: 0,
            commit: 0,
            client_id: 0,
            request_number: 0,
            context: 0,
            parent: 0,
            aux: 0,
        }
    }

    fn encode_into(&self, out: &mut [u8; HEADER_SIZE]) {
        out[8..16].copy_from_slice(&self.checksum_body.to_le_bytes());
        out[16..24].copy_from_slice(&self.cluster.to_le_bytes());
        out[24..28].copy_from_slice(&self.size.to_le_bytes());
        out[28..30].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        out[30] = self.command as u8;
        out[31] = self.replica;
        for (index, value) in [
            self.view,
            self.op,
            self.commit,
            self.client_id,
            self.request_number,
            self.context,
            self.parent,
            self.aux,
        ]
        .into_iter()
        .enumerate()
        {
            let start = 32 + index * 8;
            out[start..start + 8].copy_from_slice(&value.to_le_bytes());
        }
        let header_checksum = checksum(&out[8..]);
        out[0..8].copy_from_slice(&header_checksum.to_le_bytes());
    }

    /// Verifies the header checksum and the fields every message shares.
    pub fn decode(bytes: &[u8; HEADER_SIZE], cluster: u64) -> Result<Header, RejectReason> {
        let u64_at = |start: usize| u64::from_le_bytes(bytes[start..start + 8].try_into().unwrap());
        if u64_at(0) != checksum(&bytes[8..]) {
            return Err(RejectReason::HeaderChecksum);
        }
        let version = u16::from_le_bytes([bytes[28], bytes[29]]);
        if version != PROTOCOL_VERSION {
            return Err(RejectReason::BadVersion);
        }
        if u64_at(16) != cluster {
            return Err(RejectReason::WrongCluster);
        }
        let command = Command::from_u8(bytes[30]).ok_or(RejectReason::UnknownCommand)?;
        let size = u32::from_le_bytes(bytes[24..28].try_into().unwrap());
        if (size as usize) < HEADER_SIZE || size as usize > MESSAGE_SIZE_MAX {
            return Err(RejectReason::BadSize);
        }
        Ok(Header {
            checksum_body: u64_at(8),
            cluster: u64_at(16),
            size,
            command,
            replica: bytes[31],
            view: u64_at(32),
            op: u64_at(40),
            commit: u64_at(48),
            client_id: u64_at(56),
            request_number: u64_at(64),
            context: u64_at(72),
            parent: u64_at(80),
            aux: u64_at(88),
        })
    }

    pub fn body_size(&self) -> usize {
        self.size as usize - HEADER_SIZE
    }
}

/// A decoded, checksum-verified message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub header: Header,
    pub body: Bytes,
}

impl Message {
    pub fn new(mut header: Header, body: Bytes) -> Message {
        header.size = (HEADER_SIZE + body.len()) as u32;
        header.checksum_body = checksum(&body);
        Message { header, body }
    }

    pub fn encode(&self) -> Bytes {
        let mut header = [0u8; HEADER_SIZE];
        self.header.encode_into(&mut header);
        let mut out = BytesMut::with_capacity(HEADER_SIZE + self.body.len());
        out.put_slice(&header);
        out.put_slice(&self.body);
        out.freeze()
    }

    /// Verifies the body against a header that `Header::decode` accepted.
    pub fn from_parts(header: Header, body: Bytes) -> Result<Message, RejectReason> {
        if body.len() != header.body_size() {
            return Err(RejectReason::BadSize);
        }
        if checksum(&body) != header.checksum_body {
            return Err(RejectReason::BodyChecksum);
        }
        Ok(Message { header, body })
    }

    /// Decodes one whole frame (header and body).
    pub fn decode(frame: &[u8], cluster: u64) -> Result<Message, RejectReason> {
        let header_bytes: &[u8; HEADER_SIZE] = frame
            .get(..HEADER_SIZE)
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or(RejectReason::BadSize)?;
        let header = Header::decode(header_bytes, cluster)?;
        Message::from_parts(header, Bytes::copy_from_slice(&frame[HEADER_SIZE..]))
    }

    /// Checks that need the cluster's shape: who may send this command, and field relations
    /// that no correct sender produces.
    pub fn validate(&self, replica_count: u8) -> Result<(), RejectReason> {
        let header = &self.header;
        let from_client = matches!(header.command, Command::Request);
        if from_client {
            if header.replica != SENDER_CLIENT {
                return Err(RejectReason::UnknownReplica);
            }
            let register_has_body =
                header.request_number == REGISTER_REQUEST_NUMBER && !self.body.is_empty();
            if header.request_number == 0 || header.client_id == 0 || register_has_body {
                return Err(RejectReason::InvalidFields);
            }
            return Ok(());
        }
        if header.replica >= replica_count {
            return Err(RejectReason::UnknownReplica);
        }
        let fields_valid = match header.command {
            Command::Prepare => header.op > 0 && header.aux <= header.view,
            Command::PrepareOk => header.op > 0,
            Command::DoViewChange | Command::StartView | Command::RecoveryResponse => {
                header.commit <= header.op
            }
            Command::Reply => false,
            Command::Hello => self.body.is_empty(),
            _ => true,
        };
        if fields_valid {
            Ok(())
        } else {
            Err(RejectReason::InvalidFields)
        }
    }
}

/// A log entry: one op, holding a batch of client requests. Entries form a hash chain through
/// `parent`, so an entry fetched from any peer can be verified against a later trusted one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub op: u64,
    pub view: u64,
    pub parent: u64,
    pub checksum: u64,
    pub body: Bytes,
}

impl Entry {
    pub fn new(op: u64, view: u64, parent: u64, body: Bytes) -> Entry {
        let checksum = Entry::compute_checksum(op, view, parent, &body);
        Entry {
            op,
            view,
            parent,
            checksum,
            body,
        }
    }

    fn compute_checksum(op: u64, view: u64, parent: u64, body: &[u8]) -> u64 {
        checksum_parts(&[
            &op.to_le_bytes(),
            &view.to_le_bytes(),
            &parent.to_le_bytes(),
            body,
        ])
    }

    pub fn checksum_valid(&self) -> bool {
        Entry::compute_checksum(self.op, self.view, self.parent, &self.body) == self.checksum
    }

    pub fn encoded_size(&self) -> usize {
        ENTRY_PREFIX_SIZE + self.body.len()
    }
}

const ENTRY_PREFIX_SIZE: usize = 36;
/// The entry or request count that starts an encoded list of entries or a batch.
pub const LIST_PREFIX_SIZE: usize = 4;

pub fn encode_entries(entries: &[&Entry]) -> Bytes {
    let size = LIST_PREFIX_SIZE
        + entries
            .iter()
            .map(|entry| entry.encoded_size())
            .sum::<usize>();
    let mut out = BytesMut::with_capacity(size);
    out.put_u32_le(entries.len() as u32);
    for entry in entries {
        out.put_u64_le(entry.op);
        out.put_u64_le(entry.view);
        out.put_u64_le(entry.parent);
        out.put_u64_le(entry.checksum);
        out.put_u32_le(entry.body.len() as u32);
        out.put_slice(&entry.body);
    }
    out.freeze()
}

/// Decodes a list of entries, verifying each entry's checksum and that ops strictly increase.
pub fn decode_entries(body: &Bytes) -> Result<Vec<Entry>, RejectReason> {
    let mut reader = Reader::new(body);
    let count = reader.u32()? as usize;
    // Each entry takes at least its prefix, so a lying count cannot force a big allocation.
    if count > body.len() / ENTRY_PREFIX_SIZE {
        return Err(RejectReason::InvalidFields);
    }
    let mut entries: Vec<Entry> = Vec::with_capacity(count);
    for _ in 0..count {
        let op = reader.u64()?;
        let view = reader.u64()?;
        let parent = reader.u64()?;
        let checksum = reader.u64()?;
        let length = reader.u32()? as usize;
        let entry = Entry {
            op,
            view,
            parent,
            checksum,
            body: reader.bytes(length)?,
        };
        if !entry.checksum_valid() {
            return Err(RejectReason::EntryChecksum);
        }
        if entries.last().is_some_and(|last| last.op >= entry.op) {
            return Err(RejectReason::InvalidFields);
        }
        entries.push(entry);
    }
    reader.finish()?;
    Ok(entries)
}

/// What a DoViewChange says about one op of its sender's log, so that the new primary can cut
/// back a head that no live replica can complete: an op that a nack quorum never acknowledged
/// cannot have been committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpStatus {
    /// The sender holds an entry for this op (it may have acknowledged it).
    Present = 0,
    /// The sender never acknowledged this op (a "nack"): it holds no entry for it, and it has
    /// not held a whole chain up to it since it last voted.
    Nack = 1,
    /// The sender lacks this op but may have acknowledged it: a corrupt record, or an entry it
    /// held before a restart. Never counted as a nack.
    Corrupt = 2,
}

impl OpStatus {
    fn from_u8(value: u8) -> Option<OpStatus> {
        match value {
            0 => Some(OpStatus::Present),
            1 => Some(OpStatus::Nack),
            2 => Some(OpStatus::Corrupt),
            _ => None,
        }
    }
}

/// One op of a DoViewChange's header list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpHeader {
    /// The checksum of the sender's entry for this op (held, or known as the parent of the
    /// next op of its verified chain), else 0.
    pub checksum: u64,
    /// The view the held entry was prepared in (`u64::MAX` if none is held): an entry of the view a
    /// log was last normal in is that view's primary's entry, whoever holds it.
    pub view: u64,
    pub status: OpStatus,
    /// `checksum` is from the sender's verified chain (it chains to the sender's head).
    pub chained: bool,
    /// The sender executed this op: it is committed, whatever log the new view takes.
    pub committed: bool,
}

/// Ops a DoViewChange reports at most: the newest of its sender's log. More than any pipeline
/// holds uncommitted, so every op a new primary may have to cut is covered.
pub const OP_HEADERS_MAX: usize = 1024;
const OP_HEADER_SIZE: usize = 18;
/// Bytes a DoViewChange's header list takes at most, on top of its entries.
pub const OP_HEADERS_BYTES_MAX: usize = LIST_PREFIX_SIZE + OP_HEADERS_MAX * OP_HEADER_SIZE;

/// A DoViewChange body: the header list (the newest ops of the sender's log, oldest first,
/// ending at its head), then its suffix of entries.
pub fn encode_do_view_change_body(headers: &[OpHeader], entries: &[&Entry]) -> Bytes {
    assert!(headers.len() <= OP_HEADERS_MAX);
    let entries = encode_entries(entries);
    let mut out =
        BytesMut::with_capacity(LIST_PREFIX_SIZE + headers.len() * OP_HEADER_SIZE + entries.len());
    out.put_u32_le(headers.len() as u32);
    for header in headers {
        out.put_u64_le(header.checksum);
        out.put_u64_le(header.view);
        out.put_u8(header.status as u8);
        out.put_u8(u8::from(header.chained) | u8::from(header.committed) << 1);
    }
    out.put_slice(&entries);
    out.freeze()
}

/// Splits a DoViewChange body into its header list and its encoded entries.
pub fn decode_do_view_change_body(body: &Bytes) -> Result<(Vec<OpHeader>, Bytes), RejectReason> {
    let mut reader = Reader::new(body);
    let count = reader.u32()? as usize;
    if count > OP_HEADERS_MAX {
        return Err(RejectReason::InvalidFields);
    }
    let mut headers = Vec::with_capacity(count);
    for _ in 0..count {
        let checksum = reader.u64()?;
        let view = reader.u64()?;
        let status = OpStatus::from_u8(reader.u8()?).ok_or(RejectReason::InvalidFields)?;
        let flags = reader.u8()?;
        if flags > 0b11 {
            return Err(RejectReason::InvalidFields);
        }
        headers.push(OpHeader {
            checksum,
            view,
            status,
            chained: flags & 1 != 0,
            committed: flags & 2 != 0,
        });
    }
    Ok((headers, reader.rest()))
}

/// One client request inside an entry's batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchedRequest {
    pub client_id: u64,
    pub request_number: u64,
    pub operation: Bytes,
}

const BATCHED_REQUEST_PREFIX_SIZE: usize = 20;

impl BatchedRequest {
    /// Bytes this request takes in an encoded batch.
    pub fn encoded_size(operation_bytes: usize) -> usize {
        BATCHED_REQUEST_PREFIX_SIZE + operation_bytes
    }
}

pub fn encode_batch(requests: &[BatchedRequest]) -> Bytes {
    let size = LIST_PREFIX_SIZE
        + requests
            .iter()
            .map(|request| BatchedRequest::encoded_size(request.operation.len()))
            .sum::<usize>();
    let mut out = BytesMut::with_capacity(size);
    out.put_u32_le(requests.len() as u32);
    for request in requests {
        out.put_u64_le(request.client_id);
        out.put_u64_le(request.request_number);
        out.put_u32_le(request.operation.len() as u32);
        out.put_slice(&request.operation);
    }
    out.freeze()
}

pub fn decode_batch(body: &Bytes) -> Result<Vec<BatchedRequest>, RejectReason> {
    let mut reader = Reader::new(body);
    let count = reader.u32()? as usize;
    if count > body.len() / BATCHED_REQUEST_PREFIX_SIZE {
        return Err(RejectReason::InvalidFields);
    }
    let mut requests = Vec::with_capacity(count);
    for _ in 0..count {
        let client_id = reader.u64()?;
        let request_number = reader.u64()?;
        let length = reader.u32()? as usize;
        requests.push(BatchedRequest {
            client_id,
            request_number,
            operation: reader.bytes(length)?,
        });
    }
    reader.finish()?;
    Ok(requests)
}

/// Bounds-checked little-endian reads from a body; every overrun is `InvalidFields`.
#[derive(Debug)]
pub struct Reader<'a> {
    bytes: &'a Bytes,
    position: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a Bytes) -> Reader<'a> {
        Reader { bytes, position: 0 }
    }

    fn take(&mut self, length: usize) -> Result<&'a [u8], RejectReason> {
        let end = self
            .position
            .checked_add(length)
            .filter(|end| *end <= self.bytes.len())
            .ok_or(RejectReason::InvalidFields)?;
        let slice = &self.bytes[self.position..end];
        self.position = end;
        Ok(slice)
    }

    pub fn u8(&mut self) -> Result<u8, RejectReason> {
        Ok(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, RejectReason> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }

    pub fn u32(&mut self) -> Result<u32, RejectReason> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    pub fn u64(&mut self) -> Result<u64, RejectReason> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    pub fn bytes(&mut self, length: usize) -> Result<Bytes, RejectReason> {
        let start = self.position;
        self.take(length)?;
        Ok(self.bytes.slice(start..start + length))
    }

    /// Everything not read yet.
    pub fn rest(self) -> Bytes {
        self.bytes.slice(self.position..)
    }

    pub fn finish(self) -> Result<(), RejectReason> {
        if self.position == self.bytes.len() {
            Ok(())
        } else {
            Err(RejectReason::InvalidFields)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: u64 = 7;

    fn prepare() -> Message {
        let entry = Entry::new(5, 2, 99, Bytes::from_static(b"batch"));
        let mut header = Header::new(Command::Prepare, CLUSTER, 1);
        header.view = 2;
        header.op = entry.op;
        header.aux = entry.view;
        header.context = entry.checksum;
        header.parent = entry.parent;
        Message::new(header, entry.body)
    }

    #[test]
    fn round_trip() {
        let message = prepare();
        let decoded = Message::decode(&message.encode(), CLUSTER).unwrap();
        assert_eq!(decoded, message);
        assert_eq!(decoded.validate(3), Ok(()));
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        let frame = prepare().encode();
        for bit in 0..frame.len() * 8 {
            let mut corrupted = frame.to_vec();
            corrupted[bit / 8] ^= 1 << (bit % 8);
            assert!(Message::decode(&corrupted, CLUSTER).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn rejections_name_their_reason() {
        let message = prepare();
        assert_eq!(
            Message::decode(&message.encode(), CLUSTER + 1),
            Err(RejectReason::WrongCluster)
        );
        assert_eq!(
            Message::decode(&message.encode()[..50], CLUSTER),
            Err(RejectReason::BadSize)
        );
        let mut from_stranger = message.clone();
        from_stranger.header.replica = 9;
        assert_eq!(from_stranger.validate(3), Err(RejectReason::UnknownReplica));
        let mut impossible = message;
        impossible.header.aux = impossible.header.view + 1;
        assert_eq!(impossible.validate(3), Err(RejectReason::InvalidFields));
    }

    #[test]
    fn entries_and_batches_round_trip_and_reject_truncation() {
        let first = Entry::new(1, 0, 0, Bytes::from_static(b"a"));
        let second = Entry::new(2, 0, first.checksum, Bytes::from_static(b"bc"));
        let encoded = encode_entries(&[&first, &second]);
        assert_eq!(decode_entries(&encoded).unwrap(), vec![first, second]);
        assert!(decode_entries(&encoded.slice(..encoded.len() - 1)).is_err());

        let batch = vec![BatchedRequest {
            client_id: 3,
            request_number: 4,
            operation: Bytes::from_static(b"put"),
        }];
        let encoded = encode_batch(&batch);
        assert_eq!(decode_batch(&encoded).unwrap(), batch);
        assert!(decode_batch(&encoded.slice(..encoded.len() - 1)).is_err());
    }

    #[test]
    fn lying_counts_do_not_allocate() {
        let body = Bytes::from_static(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(decode_entries(&body), Err(RejectReason::InvalidFields));
        assert_eq!(decode_batch(&body), Err(RejectReason::InvalidFields));
    }
}
