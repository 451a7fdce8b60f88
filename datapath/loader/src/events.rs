//! The ring buffer of verdict events, as an async stream.
use std::{
    collections::VecDeque,
    os::fd::{AsFd, BorrowedFd},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use moat_common::Event;
use tokio::io::unix::AsyncFd;

use crate::{Error, Result};

/// How late the async reader may read an event: the datapath wakes it only once
/// `capacity::EVENTS_WAKEUP_BYTES` are unread, and it looks on its own this often.
pub const EVENT_FLUSH: Duration = Duration::from_millis(50);

/// Moves every event the ring buffer holds into `pending`.
fn read_ring(ring: &mut RingBuf<MapData>, pending: &mut VecDeque<Event>) {
    while let Some(item) = ring.next() {
        if item.len() >= size_of::<Event>() {
            // SAFETY: the kernel wrote a whole `Event` (repr(C), any bit pattern valid); the
            // record may not be aligned for it.
            let ev = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) };
            pending.push_back(ev);
        }
    }
}

/// Verdict events in the order the kernel produced them. The kernel never blocks on a slow
/// reader: a full buffer drops events and counts them (`Datapath::event_stats().lost`).
pub struct EventStream {
    ring: RingBuf<MapData>,
    pending: VecDeque<Event>,
}

impl EventStream {
    pub(crate) fn take(ebpf: &mut aya::Ebpf) -> Result<Self> {
        let map = ebpf.take_map("EVENTS").ok_or(Error::Map {
            name: "EVENTS",
            source: aya::maps::MapError::InvalidName {
                name: "EVENTS".into(),
            },
        })?;
        let ring = RingBuf::try_from(map).map_err(|source| Error::Map {
            name: "EVENTS",
            source,
        })?;
        Ok(EventStream {
            ring,
            pending: VecDeque::new(),
        })
    }

    /// Every event available now, without waiting.
    pub fn drain(&mut self) -> Vec<Event> {
        self.fill();
        self.pending.drain(..).collect()
    }

    fn fill(&mut self) {
        read_ring(&mut self.ring, &mut self.pending);
    }

    /// Wait for events and return them as they come (requires a tokio runtime).
    pub fn into_async(self) -> std::io::Result<AsyncEventStream> {
        // SAFETY: the ring buffer owns its descriptor and lives inside the AsyncFd, so the
        // descriptor stays open for as long as it is registered.
        let fd = unsafe { AsyncFd::register(self.ring) }.map_err(std::io::Error::from)?;
        Ok(AsyncEventStream {
            fd,
            pending: self.pending,
        })
    }
}

/// The ring buffer's descriptor, for callers with their own event loop. Like the async
/// stream, they are woken only once `capacity::EVENTS_WAKEUP_BYTES` are unread, and must look
/// on their own for the rest.
impl AsFd for EventStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

/// The async form of [`EventStream`].
pub struct AsyncEventStream {
    fd: AsyncFd<RingBuf<MapData>>,
    pending: VecDeque<Event>,
}

impl AsyncEventStream {
    /// The next event, waiting for one if none is buffered.
    pub async fn next(&mut self) -> std::io::Result<Event> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Ok(ev);
            }
            read_ring(self.fd.get_mut(), &mut self.pending);
            if !self.pending.is_empty() {
                continue;
            }
            // The datapath wakes this reader only once a batch has gathered (see its `emit`):
            // wait for that, or look again after `EVENT_FLUSH`.
            if let Ok(guard) = tokio::time::timeout(EVENT_FLUSH, self.fd.readable_mut()).await {
                guard?.clear_ready();
            }
        }
    }
}
