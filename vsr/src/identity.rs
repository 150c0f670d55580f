//! Whom an inbound connection speaks for. A peer replica's connection fixes the replica it is
//! with its first message, checked against the configuration (a replica index of the cluster,
//! at its configured host, not this replica, not connected already); a client's connection
//! carries only requests. So no client can send a Prepare, StartView or DoViewChange as a
//! replica, and no replica's connection can speak for another.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use tokio::net::TcpStream;
use vsr_probes::{Command, RejectReason};

use crate::message::{Message, SENDER_CLIENT};
use crate::replica::Source;

/// A peer machine that vanished without closing its connections (power loss, a cut cable) is
/// noticed within about five seconds, so the connection its replica makes when it comes back
/// is not refused for a claim that a dead connection still holds.
pub(crate) fn keep_alive(stream: &TcpStream) {
    let fd = stream.as_raw_fd();
    for (level, option, value) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 2),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
    ] {
        let value: libc::c_int = value;
        // SAFETY: `fd` is an open socket for the duration of the call, and the option value
        // is a c_int of the size passed.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                option,
                (&raw const value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// What inbound connections may claim to be, shared by their tasks.
#[derive(Clone)]
pub(crate) struct Peers {
    me: u8,
    addresses: Arc<Vec<SocketAddr>>,
    /// The connection each replica speaks through: the first claim wins while it lives.
    claims: Arc<Mutex<HashMap<u8, u64>>>,
}

impl Peers {
    pub(crate) fn new(me: u8, addresses: Arc<Vec<SocketAddr>>) -> Peers {
        Peers {
            me,
            addresses,
            claims: Arc::default(),
        }
    }

    pub(crate) fn me(&self) -> u8 {
        self.me
    }

    /// Lets `connection`, from `ip`, speak for `replica` from now on, if it can be that replica:
    /// one of the configuration's other replicas, at the configured address's host (unless
    /// that address is a wildcard), and not speaking through another live connection.
    fn claim(&self, replica: u8, connection: u64, ip: Option<IpAddr>) -> Result<(), RejectReason> {
        let configured = self
            .addresses
            .get(replica as usize)
            .ok_or(RejectReason::UnknownReplica)?
            .ip();
        let host_matches = configured.is_unspecified()
            || ip.is_some_and(|ip| ip.to_canonical() == configured.to_canonical());
        if replica == self.me || !host_matches {
            return Err(RejectReason::PeerIdentity);
        }
        let mut claims = self.claims.lock().unwrap();
        match claims.get(&replica) {
            Some(holder) if *holder != connection => Err(RejectReason::PeerIdentity),
            _ => {
                claims.insert(replica, connection);
                Ok(())
            }
        }
    }

    pub(crate) fn release(&self, replica: u8, connection: u64) {
        let mut claims = self.claims.lock().unwrap();
        if claims.get(&replica) == Some(&connection) {
            claims.remove(&replica);
        }
    }
}

/// Who an inbound connection speaks for: fixed by its first message, never changed after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Identity {
    #[default]
    Unknown,
    Client,
    Replica(u8),
}

impl Identity {
    /// The source of `message` on this connection, fixing the connection's identity with its
    /// first message. A client connection carries only requests; a replica's carries only
    /// that replica's protocol messages.
    pub(crate) fn source_of(
        &mut self,
        message: &Message,
        connection: u64,
        ip: Option<IpAddr>,
        peers: &Peers,
    ) -> Result<Source, RejectReason> {
        let claimed = message.header.replica;
        if *self == Identity::Unknown {
            *self = if claimed == SENDER_CLIENT {
                Identity::Client
            } else {
                peers.claim(claimed, connection, ip)?;
                Identity::Replica(claimed)
            };
        }
        match *self {
            Identity::Client
                if claimed == SENDER_CLIENT && message.header.command == Command::Request =>
            {
                Ok(Source::Client(connection))
            }
            Identity::Replica(replica)
                if claimed == replica && message.header.command != Command::Request =>
            {
                Ok(Source::Replica(replica))
            }
            Identity::Unknown | Identity::Client | Identity::Replica(_) => {
                Err(RejectReason::PeerIdentity)
            }
        }
    }

    /// Who a rejection is charged to: only an established replica identity is trusted.
    pub(crate) fn rejected_source(self, connection: u64) -> Source {
        match self {
            Identity::Replica(replica) => Source::Replica(replica),
            Identity::Unknown | Identity::Client => Source::Client(connection),
        }
    }
}
