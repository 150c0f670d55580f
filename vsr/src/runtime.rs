//! Runs a replica over real TCP and disk: one thread, one event loop. Connection tasks decode
//! frames and queue them; the loop feeds a batch of them to the replica, then calls `flush`,
//! which makes the journal durable with one fdatasync (the group commit) before any output is
//! sent.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use vsr_probes::{Command, RejectReason};

use crate::identity::{Identity, Peers, keep_alive};
use crate::message::{Header, Message};
use crate::replica::{Destination, Replica, Source};
use crate::storage::FileStorage;
use crate::transport::{FrameError, read_frame, spawn_writer};

const TICK: Duration = Duration::from_millis(10);
/// Inputs handled before the next group commit; bounds the latency one flush adds.
const EVENTS_PER_FLUSH_MAX: usize = 4096;
/// Waits between attempts to reach a peer double from the first to the most: a peer that starts
/// a few milliseconds after us (a whole cluster starting) is reached in milliseconds, while
/// one that is down costs at most ten attempts a second.
const RECONNECT_DELAY_FIRST: Duration = Duration::from_millis(2);
const RECONNECT_DELAY_MAX: Duration = Duration::from_millis(100);

enum Event {
    Message {
        source: Source,
        message: Message,
    },
    Rejected {
        reason: RejectReason,
        source: Source,
    },
    ConnectionOpened {
        connection: u64,
        writer: mpsc::Sender<Bytes>,
    },
    ConnectionClosed {
        connection: u64,
    },
    PeerUp {
        replica: u8,
        writer: mpsc::Sender<Bytes>,
    },
    PeerDown {
        replica: u8,
    },
}

/// Serves `replica` until SIGINT or SIGTERM. SIGUSR1 asks for a view change (operator request).
pub async fn run(
    mut replica: Replica<FileStorage>,
    addresses: Vec<SocketAddr>,
    cluster: u64,
) -> anyhow::Result<()> {
    let me = replica.replica_id();
    let listen = addresses[me as usize];
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|error| anyhow::anyhow!("cannot listen on {listen}: {error}"))?;
    let (events, mut inbox) = mpsc::channel::<Event>(64 * 1024);
    let peers = Peers::new(me, Arc::new(addresses.clone()));
    tokio::spawn(accept_loop(listener, events.clone(), cluster, peers));
    for (peer, address) in addresses.iter().enumerate() {
        if peer != me as usize {
            tokio::spawn(connect_loop(
                me,
                peer as u8,
                *address,
                events.clone(),
                cluster,
            ));
        }
    }
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut operator = signal(SignalKind::user_defined1())?;
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let started = Instant::now();
    let now_ns = || started.elapsed().as_nanos() as u64;
    let mut connections: HashMap<u64, mpsc::Sender<Bytes>> = HashMap::new();
    let mut peers: HashMap<u8, mpsc::Sender<Bytes>> = HashMap::new();
    let mut logged = String::new();
    let mut logged_transfers = 0;
    eprintln!(
        "replica {me}: listening on {listen}; {}",
        replica.describe()
    );
    loop {
        tokio::select! {
            event = inbox.recv() => {
                let Some(event) = event else { break };
                let mut handled = 0;
                let mut next = Some(event);
                while let Some(event) = next.take() {
                    handle(&mut replica, now_ns(), event, &mut connections, &mut peers);
                    handled += 1;
                    if handled < EVENTS_PER_FLUSH_MAX {
                        next = inbox.try_recv().ok();
                    }
                }
            }
            _ = ticker.tick() => replica.on_tick(now_ns()),
            _ = operator.recv() => {
                eprintln!("replica {me}: SIGUSR1: operator requested a view change");
                replica.on_operator_view_change(now_ns());
            }
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        }
        let outgoing = replica.flush(now_ns()).map_err(|error| {
            anyhow::anyhow!("storage failed, stopping before acknowledging anything: {error}")
        })?;
        for message in outgoing {
            let writer = match message.destination {
                Destination::Replica(peer) => peers.get(&peer),
                Destination::Client(connection) => connections.get(&connection),
            };
            // A full or closed queue drops the frame: VSR retransmits, clients retry.
            if let Some(writer) = writer {
                let _ = writer.try_send(message.frame);
            }
        }
        log_transitions(&replica, &mut logged);
        if replica.state_transfers_installed() > logged_transfers {
            logged_transfers = replica.state_transfers_installed();
            eprintln!(
                "replica {me}: installed a peer's checkpoint (state transfer); {}",
                replica.describe()
            );
        }
    }
    replica.flush(now_ns())?;
    eprintln!("replica {me}: stopped; {}", replica.describe());
    Ok(())
}

/// Logs status and view changes and state transfers, not every op.
fn log_transitions(replica: &Replica<FileStorage>, logged: &mut String) {
    let transfer = if replica.is_transferring_state() {
        ", transferring state"
    } else {
        ""
    };
    let state = format!(
        "{:?} in view {}{transfer}",
        replica.status(),
        replica.view()
    );
    if *logged != state {
        eprintln!(
            "replica {}: {state}; {}",
            replica.replica_id(),
            replica.describe()
        );
        *logged = state;
    }
}

fn handle(
    replica: &mut Replica<FileStorage>,
    now_ns: u64,
    event: Event,
    connections: &mut HashMap<u64, mpsc::Sender<Bytes>>,
    peers: &mut HashMap<u8, mpsc::Sender<Bytes>>,
) {
    match event {
        Event::Message { source, message } => replica.on_message(now_ns, source, message),
        Event::Rejected { reason, source } => replica.on_rejected(reason, source),
        Event::ConnectionOpened { connection, writer } => {
            connections.insert(connection, writer);
        }
        Event::ConnectionClosed { connection } => {
            connections.remove(&connection);
        }
        Event::PeerUp {
            replica: peer,
            writer,
        } => {
            peers.insert(peer, writer);
        }
        Event::PeerDown { replica: peer } => {
            peers.remove(&peer);
            replica.on_peer_disconnected(now_ns, peer);
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    events: mpsc::Sender<Event>,
    cluster: u64,
    peers: Peers,
) {
    let mut next_connection = 1u64;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        keep_alive(&stream);
        let connection = next_connection;
        next_connection += 1;
        tokio::spawn(serve_connection(
            stream,
            connection,
            events.clone(),
            cluster,
            peers.clone(),
        ));
    }
}

/// Reads frames from one inbound connection (a client or a peer's outbound connection). The
/// first message fixes whom the connection speaks for; a message it cannot send (a replica's
/// on a client connection, another replica's, a claim it cannot make) is counted and closes
/// the connection, unread by the protocol.
async fn serve_connection(
    stream: TcpStream,
    connection: u64,
    events: mpsc::Sender<Event>,
    cluster: u64,
    peers: Peers,
) {
    let ip = stream.peer_addr().ok().map(|address| address.ip());
    let (mut reader, writer) = stream.into_split();
    let writer = spawn_writer(writer);
    if events
        .send(Event::ConnectionOpened { connection, writer })
        .await
        .is_err()
    {
        return;
    }
    let mut identity = Identity::default();
    loop {
        let event = match read_frame(&mut reader, cluster).await {
            Ok(message) => match identity.source_of(&message, connection, ip, &peers) {
                Ok(source) => Event::Message { source, message },
                Err(reason) => {
                    eprintln!(
                        "replica {}: closed connection {connection} ({identity:?}): {} for a {:?} \
                         claiming replica {}",
                        peers.me(),
                        reason.label(),
                        message.header.command,
                        message.header.replica
                    );
                    let source = identity.rejected_source(connection);
                    let _ = events.send(Event::Rejected { reason, source }).await;
                    break;
                }
            },
            Err(FrameError::BadBody(reason)) => Event::Rejected {
                reason,
                source: identity.rejected_source(connection),
            },
            Err(FrameError::BadHeader(reason)) => {
                let source = identity.rejected_source(connection);
                let _ = events.send(Event::Rejected { reason, source }).await;
                break;
            }
            Err(FrameError::Closed) => break,
        };
        if events.send(event).await.is_err() {
            return;
        }
    }
    if let Identity::Replica(replica) = identity {
        peers.release(replica, connection);
    }
    let _ = events.send(Event::ConnectionClosed { connection }).await;
}

/// Keeps one outbound connection to a peer, reconnecting after it restarts. Each connection
/// starts with a Hello: the peer knows from the start which replica the connection speaks for,
/// so no other connection can claim this replica there first.
async fn connect_loop(
    me: u8,
    peer: u8,
    address: SocketAddr,
    events: mpsc::Sender<Event>,
    cluster: u64,
) {
    let hello = Message::new(Header::new(Command::Hello, cluster, me), Bytes::new()).encode();
    let mut delay = RECONNECT_DELAY_FIRST;
    loop {
        let stream = match TcpStream::connect(address).await {
            Ok(stream) => stream,
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RECONNECT_DELAY_MAX);
                continue;
            }
        };
        delay = RECONNECT_DELAY_FIRST;
        let _ = stream.set_nodelay(true);
        let (mut reader, writer) = stream.into_split();
        let writer = spawn_writer(writer);
        if writer.send(hello.clone()).await.is_err() {
            continue;
        }
        if events
            .send(Event::PeerUp {
                replica: peer,
                writer,
            })
            .await
            .is_err()
        {
            return;
        }
        // Peers never send on our outbound connection; a read returning means it closed.
        let mut scratch = [0u8; 64];
        while matches!(tokio::io::AsyncReadExt::read(&mut reader, &mut scratch).await, Ok(n) if n > 0)
        {
        }
        if events
            .send(Event::PeerDown { replica: peer })
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Parses `host:port,host:port,…` into the cluster's addresses, in replica order.
pub fn parse_addresses(text: &str) -> io::Result<Vec<SocketAddr>> {
    text.split(',')
        .map(|part| {
            part.trim().parse::<SocketAddr>().map_err(|error| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("bad address {part:?}: {error}"),
                )
            })
        })
        .collect()
}
