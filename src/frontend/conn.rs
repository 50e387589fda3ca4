//! The client's side of a session: its stream, the bytes read from it and not yet handled, parsing them into an
//! `Input` (protocol/request.rs), and writes. The read buffer exists only while there is something in it: an
//! idle client holds none.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::buffers::{Buffers, CHUNK};
use crate::error::{Error, Result};
use crate::net::Stream;
use crate::protocol::frame::frontend_len;
use crate::protocol::request::Input;

pub struct ClientConn {
    pub stream: Stream,
    rbuf: BytesMut,
    buffers: Arc<Buffers>,
    max_message: usize,
}

impl ClientConn {
    pub fn new(stream: Stream, rbuf: BytesMut, buffers: Arc<Buffers>, max_message: usize) -> ClientConn {
        ClientConn { stream, rbuf, buffers, max_message }
    }

    /// Every complete message received so far, parsed; `None` if there is not one yet. A message that breaks the
    /// framing rules ends the connection (08P01).
    /// `spare`: the allocations of the last input, reused.
    pub fn input(&mut self, spare: &mut Option<Input>) -> Result<Option<Input>> {
        let protocol = |e: crate::protocol::frame::FrameError| Error::Protocol(e.to_string());
        if frontend_len(&self.rbuf, self.max_message).map_err(protocol)?.is_none() {
            return Ok(None);
        }
        let reuse = spare.take().unwrap_or_default();
        Input::take(&mut self.rbuf, self.max_message, reuse).map_err(protocol)
    }

    /// Whether reading ahead (while a request waits, e.g. a batch member) stays bounded: no more than one message
    /// of the largest size and one read beyond it are held.
    pub fn may_read_ahead(&self) -> bool {
        self.rbuf.len() < self.max_message + CHUNK
    }

    /// Puts `bytes` back in front of what was received, to be handled again (a request pgsurge re-runs).
    pub fn unread(&mut self, bytes: &[u8]) {
        let mut b = BytesMut::with_capacity(bytes.len() + self.rbuf.len());
        b.extend_from_slice(bytes);
        b.extend_from_slice(&self.rbuf);
        self.rbuf = b;
    }

    /// Reads what the client sent next; 0 at end of stream. A buffer is taken only once there is data.
    /// Cancel-safe: bytes read are never lost.
    pub async fn read(&mut self) -> std::io::Result<usize> {
        self.stream.readable().await?;
        if self.rbuf.capacity() - self.rbuf.len() < CHUNK / 2 {
            if self.rbuf.capacity() == 0 {
                self.rbuf = self.buffers.take();
            } else {
                self.rbuf.reserve(CHUNK);
            }
        }
        self.stream.read_buf(&mut self.rbuf).await
    }

    /// Nothing received and not yet handled, and a socket whose readiness shows what the client sends.
    pub fn parkable(&self) -> bool {
        self.rbuf.is_empty() && !self.stream.is_tls()
    }

    /// For a parked client: the socket and the buffer pool, the read buffer given back.
    pub fn parked(mut self) -> (Stream, Arc<Buffers>) {
        self.idle();
        (self.stream, self.buffers)
    }

    /// Gives the read buffer back when nothing is in it (a client between requests holds no buffer).
    pub fn idle(&mut self) {
        if self.rbuf.is_empty() && self.rbuf.capacity() > 0 {
            self.buffers.give(std::mem::take(&mut self.rbuf));
        }
    }

    pub async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    /// For the wire trace: the client's address.
    pub fn peer(&self) -> Option<std::net::SocketAddr> {
        self.stream.tcp().and_then(|t| t.peer_addr().ok())
    }

    pub fn into_stream(self) -> Stream {
        self.stream
    }
}
