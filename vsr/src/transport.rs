//! Framing over TCP, shared by the replica runtime and the load generator: read one verified
//! message at a time, and write frames from a channel with as few syscalls as the queue allows.

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;
use vsr_probes::RejectReason;

use crate::message::{HEADER_SIZE, Header, Message};

/// Why reading a frame stopped.
#[derive(Debug)]
pub enum FrameError {
    /// The peer closed the connection or the socket failed.
    Closed,
    /// The header failed a check: framing can no longer be trusted, so the connection must go.
    BadHeader(RejectReason),
    /// The body failed a check; the stream is still in step and reading may continue.
    BadBody(RejectReason),
}

pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    cluster: u64,
) -> Result<Message, FrameError> {
    let mut header_bytes = [0u8; HEADER_SIZE];
    reader
        .read_exact(&mut header_bytes)
        .await
        .map_err(|_| FrameError::Closed)?;
    let header = Header::decode(&header_bytes, cluster).map_err(FrameError::BadHeader)?;
    let mut body = vec![0u8; header.body_size()];
    reader
        .read_exact(&mut body)
        .await
        .map_err(|_| FrameError::Closed)?;
    Message::from_parts(header, Bytes::from(body)).map_err(FrameError::BadBody)
}

/// Bounds memory per connection: a peer that stops reading loses messages (which VSR tolerates:
/// it repairs, or fetches a checkpoint) instead of growing this queue. A few hundred
/// milliseconds of prepares at saturation.
pub const WRITE_QUEUE_FRAMES: usize = 1024;

/// Spawns a task writing every frame sent on the returned channel; it ends when the channel
/// closes or the socket fails.
pub fn spawn_writer<W: AsyncWrite + Unpin + Send + 'static>(writer: W) -> mpsc::Sender<Bytes> {
    let (sender, mut receiver) = mpsc::channel::<Bytes>(WRITE_QUEUE_FRAMES);
    tokio::spawn(async move {
        let mut writer = BufWriter::with_capacity(256 * 1024, writer);
        while let Some(frame) = receiver.recv().await {
            if writer.write_all(&frame).await.is_err() {
                return;
            }
            while let Ok(frame) = receiver.try_recv() {
                if writer.write_all(&frame).await.is_err() {
                    return;
                }
            }
            if writer.flush().await.is_err() {
                return;
            }
        }
    });
    sender
}
