//! The ring buffer of verdict events, as an async stream.
use std::collections::VecDeque;

use aya::maps::{MapData, RingBuf};
use moat_common::Event;
use tokio::io::unix::AsyncFd;

use crate::{Error, Result};

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
        while let Some(item) = self.ring.next() {
            if item.len() >= size_of::<Event>() {
                // SAFETY: the kernel wrote a whole `Event` (repr(C), any bit pattern valid);
                // the record may not be aligned for it.
                let ev = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) };
                self.pending.push_back(ev);
            }
        }
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
            let mut guard = self.fd.readable_mut().await?;
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if item.len() >= size_of::<Event>() {
                    // SAFETY: as in `EventStream::fill`.
                    let ev = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) };
                    self.pending.push_back(ev);
                }
            }
            guard.clear_ready();
        }
    }
}
