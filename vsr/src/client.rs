//! The client side of the protocol, transport-free: one session with request numbers, a guess
//! of who the primary is, and what to do with each reply. The simulator and `vsr-bench` drive it.

use bytes::Bytes;
use vsr_probes::Command;

use crate::message::{Header, Message, REGISTER_REQUEST_NUMBER, ReplyStatus, SENDER_CLIENT};

#[derive(Debug)]
pub struct Client {
    cluster: u64,
    replica_count: u8,
    client_id: u64,
    request_number: u64,
    /// The replica the current request was last sent to.
    target: u8,
    pending: Option<Message>,
}

/// What a reply means for the request in flight.
#[derive(Debug, PartialEq, Eq)]
pub enum ReplyOutcome {
    /// Committed at `op` with this result.
    Done { op: u64, result: Bytes },
    /// Not the primary: resend to `target`.
    Redirect { target: u8 },
    /// The session is gone; start a new one with `Client::renew`.
    Evicted,
    /// The operation is larger than the cluster accepts: it was dropped, not executed. The
    /// session stays valid for the next request.
    TooLarge,
    /// Not for the request in flight (a duplicate or stale reply).
    Ignore,
}

impl Client {
    pub fn new(cluster: u64, replica_count: u8, client_id: u64) -> Client {
        assert!(client_id != 0 && replica_count > 0);
        Client {
            cluster,
            replica_count,
            client_id,
            request_number: 0,
            target: 0,
            pending: None,
        }
    }

    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    pub fn request_number(&self) -> u64 {
        self.request_number
    }

    pub fn target(&self) -> u8 {
        self.target
    }

    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    pub fn is_registered(&self) -> bool {
        self.request_number >= REGISTER_REQUEST_NUMBER
    }

    /// Starts the session: request number 1, no operation.
    pub fn register(&mut self) -> Bytes {
        assert!(!self.is_registered());
        self.send(Bytes::new())
    }

    /// Starts the next request; returns the frame to send to `target()`.
    pub fn request(&mut self, operation: Bytes) -> Bytes {
        assert!(self.is_registered(), "register the session first");
        self.send(operation)
    }

    fn send(&mut self, operation: Bytes) -> Bytes {
        assert!(self.pending.is_none(), "one request in flight per session");
        self.request_number += 1;
        let mut header = Header::new(Command::Request, self.cluster, SENDER_CLIENT);
        header.client_id = self.client_id;
        header.request_number = self.request_number;
        let message = Message::new(header, operation);
        let frame = message.encode();
        self.pending = Some(message);
        frame
    }

    /// The request timed out: the same request, to the next replica.
    pub fn retry(&mut self) -> Option<Bytes> {
        self.target = (self.target + 1) % self.replica_count;
        self.pending.as_ref().map(Message::encode)
    }

    /// The frame of the request in flight, to resend after a redirect.
    pub fn pending_frame(&self) -> Option<Bytes> {
        self.pending.as_ref().map(Message::encode)
    }

    /// A new session after eviction: a fresh client id, numbering from 1 again.
    pub fn renew(&mut self, client_id: u64) {
        assert!(client_id != 0);
        self.client_id = client_id;
        self.request_number = 0;
        self.pending = None;
    }

    pub fn on_reply(&mut self, reply: &Message) -> ReplyOutcome {
        let header = &reply.header;
        let matches = header.command == Command::Reply
            && header.client_id == self.client_id
            && header.request_number == self.request_number
            && self.pending.is_some();
        if !matches {
            return ReplyOutcome::Ignore;
        }
        match ReplyStatus::from_u64(header.aux) {
            Some(ReplyStatus::Ok) => {
                self.pending = None;
                self.target = header.replica;
                ReplyOutcome::Done {
                    op: header.op,
                    result: reply.body.clone(),
                }
            }
            Some(ReplyStatus::NotPrimary) => {
                self.target = (header.view % u64::from(self.replica_count)) as u8;
                ReplyOutcome::Redirect {
                    target: self.target,
                }
            }
            Some(ReplyStatus::SessionEvicted) => {
                self.pending = None;
                ReplyOutcome::Evicted
            }
            Some(ReplyStatus::TooLarge) => {
                self.pending = None;
                ReplyOutcome::TooLarge
            }
            None => ReplyOutcome::Ignore,
        }
    }
}
