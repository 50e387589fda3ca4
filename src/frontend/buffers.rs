//! Read buffers lent to client connections while they have data: an idle client holds none (thousands of idle
//! clients cost no buffer memory), and a busy one does not pay for an allocation per request.

use bytes::BytesMut;
use parking_lot::Mutex;

/// Room made for one read: a typical request, or a good part of a large one.
pub const CHUNK: usize = 8 * 1024;

/// Buffers kept for reuse at most (the rest are freed): 512 KiB. Enough for the clients reading at one moment;
/// more would be memory held after a crowd of clients has gone (4,096 kept 32 MiB after 10,000 clients left).
const KEEP: usize = 64;

#[derive(Default)]
pub struct Buffers {
    free: Mutex<Vec<BytesMut>>,
}

impl Buffers {
    /// A buffer with room for `CHUNK` bytes.
    pub fn take(&self) -> BytesMut {
        self.free.lock().pop().unwrap_or_else(|| BytesMut::with_capacity(CHUNK))
    }

    /// Takes back an empty buffer. One that grew for a large message, or a small one (the handshake's), is freed
    /// rather than kept.
    pub fn give(&self, mut b: BytesMut) {
        debug_assert!(b.is_empty());
        b.clear();
        if b.capacity() < CHUNK / 2 {
            return;
        }
        // Reclaims the whole allocation once nothing else shares it (a parsed input no longer alive).
        b.reserve(CHUNK);
        if b.capacity() > 4 * CHUNK {
            return;
        }
        let mut free = self.free.lock();
        if free.len() < KEEP {
            free.push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_for_reuse_unless_they_grew_large() {
        let pool = Buffers::default();
        let b = pool.take();
        let ptr = b.as_ptr();
        pool.give(b);
        assert_eq!(pool.take().as_ptr(), ptr, "the same allocation again");
        let mut big = BytesMut::with_capacity(10 * CHUNK);
        big.extend_from_slice(&[1; 100]);
        big.clear();
        pool.give(big);
        assert!(pool.free.lock().is_empty());
    }
}
