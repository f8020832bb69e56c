//! Readiness of a shard's client sockets through one edge-triggered epoll set.
//!
//! glommio arms a one-shot io_uring poll each time a socket has nothing to read, so a shard
//! serving many connections with one request each in flight paid a poll submission and its
//! completion's task work per request: about 14% of a 128 B put's server CPU in `perf`. Here
//! each socket is registered once ([`Readiness::register`]); one task ([`Readiness::drive`])
//! waits for the set itself with a single io_uring poll, reads every ready socket from
//! `epoll_wait` and wakes its reader. A reader ([`SocketReader`]) reads with `recv` until
//! `EAGAIN` or a short read, then waits for the socket's next edge.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// Events taken from the set per `epoll_wait`.
const EVENTS_PER_WAIT: usize = 256;
/// Event bits that say the peer shut down or the socket failed.
const HANG_UP: u32 = u32::from_ne_bytes((libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR).to_ne_bytes());

#[derive(Debug, Default)]
struct Slot {
    /// The socket may have something to read (or an end or error to report).
    ready: bool,
    /// The reader waiting for it.
    waker: Option<Waker>,
    in_use: bool,
    /// The peer shut down (or the socket failed): an edge that a short read does not consume,
    /// so from then on the reader reads until EOF or EAGAIN.
    hung_up: bool,
}

/// One shard's epoll set of client sockets.
#[derive(Debug)]
pub struct Readiness {
    epoll: OwnedFd,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<usize>>,
    /// Waiting on the set failed: every reader gets an error instead of waiting forever.
    failed: Cell<bool>,
}

/// A socket's place in a [`Readiness`] set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token(usize);

fn check(result: libc::c_int) -> io::Result<()> {
    if result < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

impl Readiness {
    /// An empty set.
    ///
    /// # Errors
    /// `epoll_create1` failed.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain system call; the descriptor it returns is owned below.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        check(fd)?;
        // SAFETY: `fd` was just returned by `epoll_create1` and nothing else owns it.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { epoll, slots: RefCell::default(), free: RefCell::default(), failed: Cell::new(false) })
    }

    /// Adds `fd` (edge-triggered, for reading). It starts ready, so the first read tries at
    /// once. [`Readiness::deregister`] it before the descriptor closes.
    ///
    /// # Errors
    /// `epoll_ctl` refused the descriptor.
    pub fn register(&self, fd: RawFd) -> io::Result<Token> {
        let index = self.free.borrow_mut().pop().unwrap_or_else(|| {
            let mut slots = self.slots.borrow_mut();
            slots.push(Slot::default());
            slots.len() - 1
        });
        let mut event = libc::epoll_event {
            events: u32::from_ne_bytes((libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET).to_ne_bytes()),
            u64: index as u64,
        };
        // SAFETY: `event` is a valid epoll_event for the duration of the call.
        let added = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &raw mut event) };
        if let Err(error) = check(added) {
            self.free.borrow_mut().push(index);
            return Err(error);
        }
        self.slots.borrow_mut()[index] = Slot { ready: true, waker: None, in_use: true, hung_up: false };
        Ok(Token(index))
    }

    /// Removes `fd` (registered as `token`) from the set and frees its slot.
    pub fn deregister(&self, token: Token, fd: RawFd) {
        // SAFETY: plain system call; a descriptor that is not in the set only makes it fail.
        unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
        self.slots.borrow_mut()[token.0] = Slot::default();
        self.free.borrow_mut().push(token.0);
    }

    /// Marks the sockets `epoll_wait` reports ready and wakes their readers; forever (run it
    /// as a task of the shard and drop it with the endpoint). If waiting on the set fails,
    /// every reader of it gets that error from then on.
    ///
    /// # Errors
    /// Waiting on the set failed.
    pub async fn drive(&self) -> io::Result<()> {
        let result = self.wait_and_wake().await;
        self.failed.set(true);
        for slot in self.slots.borrow_mut().iter_mut() {
            if let Some(waker) = slot.waker.take() {
                waker.wake();
            }
        }
        result
    }

    async fn wait_and_wake(&self) -> io::Result<()> {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT];
        loop {
            glommio::net::readable(self.epoll.as_raw_fd()).await?;
            loop {
                // SAFETY: `events` has room for `EVENTS_PER_WAIT` entries; a zero timeout never
                // blocks the executor.
                let count = unsafe {
                    libc::epoll_wait(
                        self.epoll.as_raw_fd(),
                        events.as_mut_ptr(),
                        libc::c_int::try_from(events.len()).unwrap_or(libc::c_int::MAX),
                        0,
                    )
                };
                if count < 0 {
                    let error = io::Error::last_os_error();
                    if error.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(error);
                }
                let count = usize::try_from(count).unwrap_or(0);
                let mut slots = self.slots.borrow_mut();
                for event in &events[..count] {
                    if let Some(slot) = usize::try_from(event.u64).ok().and_then(|index| slots.get_mut(index))
                        && slot.in_use
                    {
                        slot.ready = true;
                        slot.hung_up |= event.events & HANG_UP != 0;
                        if let Some(waker) = slot.waker.take() {
                            waker.wake();
                        }
                    }
                }
                if count < EVENTS_PER_WAIT {
                    break;
                }
            }
        }
    }

    fn poll_ready(&self, token: Token, context: &Context<'_>) -> Poll<()> {
        let mut slots = self.slots.borrow_mut();
        let slot = &mut slots[token.0];
        if slot.ready || self.failed.get() {
            return Poll::Ready(());
        }
        if !slot.waker.as_ref().is_some_and(|known| known.will_wake(context.waker())) {
            slot.waker = Some(context.waker().clone());
        }
        Poll::Pending
    }

    fn not_ready(&self, token: Token) {
        self.slots.borrow_mut()[token.0].ready = false;
    }

    /// After a short read: the socket's queue is empty, and data arriving later raises a new
    /// edge; unless the peer hung up, whose edge may already have been taken.
    fn drained(&self, token: Token) {
        let mut slots = self.slots.borrow_mut();
        let slot = &mut slots[token.0];
        if !slot.hung_up {
            slot.ready = false;
        }
    }
}

/// The reading side of a registered socket: `recv` until `EAGAIN` or a short read, then wait
/// for the next edge.
#[derive(Debug)]
pub struct SocketReader {
    readiness: Rc<Readiness>,
    token: Token,
    fd: RawFd,
}

impl SocketReader {
    /// Reads `fd`, which must be registered in `readiness` as `token` and stay open while this
    /// reader is used.
    pub fn new(readiness: Rc<Readiness>, token: Token, fd: RawFd) -> Self {
        Self { readiness, token, fd }
    }
}

impl futures_lite::AsyncRead for SocketReader {
    fn poll_read(self: Pin<&mut Self>, context: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        loop {
            if self.readiness.poll_ready(self.token, context).is_pending() {
                return Poll::Pending;
            }
            if self.readiness.failed.get() {
                return Poll::Ready(Err(io::Error::other("the shard's epoll set failed")));
            }
            // SAFETY: `buf` is valid for `buf.len()` bytes; the descriptor is open (the caller
            // keeps it so while reading).
            let read = unsafe { libc::recv(self.fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if read >= 0 {
                let read = usize::try_from(read).unwrap_or(0);
                // A short read emptied the socket's queue: what arrives after it raises a new
                // edge, so the `recv` that would only answer EAGAIN is skipped (one system call
                // per request with one in flight).
                if read > 0 && read < buf.len() {
                    self.readiness.drained(self.token);
                }
                return Poll::Ready(Ok(read));
            }
            let error = io::Error::last_os_error();
            match error.kind() {
                io::ErrorKind::WouldBlock => self.readiness.not_ready(self.token),
                io::ErrorKind::Interrupted => {}
                _ => return Poll::Ready(Err(error)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::rc::Rc;
    use std::time::Duration;

    use futures_lite::AsyncReadExt;

    use super::{Readiness, SocketReader};

    /// Runs `body` on a glommio executor with a driven set.
    fn with_set(body: impl AsyncFnOnce(Rc<Readiness>) + 'static) {
        crate::runtime::run_local("readiness-test", async move {
            let readiness = Rc::new(Readiness::new().expect("epoll set"));
            let driver = {
                let readiness = Rc::clone(&readiness);
                glommio::spawn_local(async move { readiness.drive().await })
            };
            body(readiness).await;
            drop(driver);
        })
        .expect("executor");
    }

    /// A socket pair whose first end is registered in `readiness`, with its reader.
    fn registered_pair(readiness: &Rc<Readiness>) -> (UnixStream, UnixStream, super::Token, SocketReader) {
        let (ours, theirs) = UnixStream::pair().expect("socket pair");
        let token = readiness.register(ours.as_raw_fd()).expect("register");
        let reader = SocketReader::new(Rc::clone(readiness), token, ours.as_raw_fd());
        (ours, theirs, token, reader)
    }

    #[test]
    fn a_reader_wakes_for_each_write_and_sees_the_end() {
        with_set(async |readiness| {
            let (ours, mut theirs, token, mut reader) = registered_pair(&readiness);
            let mut buf = [0u8; 64];
            // Nothing yet: the read waits (and is still waiting after a while).
            let waited = futures_lite::future::or(async { Some(reader.read(&mut buf).await) }, async {
                glommio::timer::sleep(Duration::from_millis(50)).await;
                None
            });
            assert!(waited.await.is_none(), "a read with nothing sent returned");
            for round in 0..3u8 {
                let writer = std::thread::spawn({
                    let mut theirs = theirs.try_clone().expect("clone");
                    move || {
                        std::thread::sleep(Duration::from_millis(20));
                        theirs.write_all(&[round; 5]).expect("write");
                    }
                });
                let read = reader.read(&mut buf).await.expect("read");
                assert_eq!(&buf[..read], &[round; 5]);
                writer.join().expect("writer");
            }
            theirs.write_all(b"last").expect("write");
            drop(theirs);
            let mut rest = Vec::new();
            reader.read_to_end(&mut rest).await.expect("read to the end");
            assert_eq!(rest, b"last");
            readiness.deregister(token, ours.as_raw_fd());
        });
    }

    #[test]
    fn bytes_sent_while_short_reads_drain_the_socket_all_arrive_in_order() {
        with_set(async |readiness| {
            let (ours, theirs, token, mut reader) = registered_pair(&readiness);
            // Writes of 1 to 150 bytes from another thread, some paused: the reader's 64-byte
            // reads are full, short, and racing the writes.
            let sent: Vec<u8> = (0..60_000u32).map(|n| (n.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
            let writer = std::thread::spawn({
                let (mut theirs, sent) = (theirs, sent.clone());
                move || {
                    let mut at = 0;
                    let mut size = 1;
                    while at < sent.len() {
                        let end = (at + size).min(sent.len());
                        theirs.write_all(&sent[at..end]).expect("write");
                        at = end;
                        size = size % 150 + 7;
                        if size % 5 == 0 {
                            std::thread::sleep(Duration::from_micros(200));
                        }
                    }
                }
            });
            let mut received = Vec::new();
            let mut buf = [0u8; 64];
            while received.len() < sent.len() {
                let read = futures_lite::future::or(async { Some(reader.read(&mut buf).await) }, async {
                    glommio::timer::sleep(Duration::from_secs(5)).await;
                    None
                });
                let read = read.await.expect("a read waited 5 s: an edge was missed").expect("read");
                received.extend_from_slice(&buf[..read]);
            }
            writer.join().expect("writer");
            assert!(received == sent, "bytes arrived out of order or changed");
            readiness.deregister(token, ours.as_raw_fd());
        });
    }

    #[test]
    fn a_freed_slot_serves_the_next_socket() {
        with_set(async |readiness| {
            let (first, _first_peer) = UnixStream::pair().expect("socket pair");
            let token = readiness.register(first.as_raw_fd()).expect("register");
            readiness.deregister(token, first.as_raw_fd());
            let (second, mut second_peer) = UnixStream::pair().expect("socket pair");
            let again = readiness.register(second.as_raw_fd()).expect("register");
            assert_eq!(again, token, "the slot is reused");
            let mut reader = SocketReader::new(Rc::clone(&readiness), again, second.as_raw_fd());
            second_peer.write_all(b"hello").expect("write");
            let mut buf = [0u8; 16];
            let read = reader.read(&mut buf).await.expect("read");
            assert_eq!(&buf[..read], b"hello");
            readiness.deregister(again, second.as_raw_fd());
        });
    }

    #[test]
    fn a_descriptor_epoll_refuses_is_an_error() {
        let readiness = Readiness::new().expect("epoll set");
        let file = std::fs::File::open("/dev/null").expect("open /dev/null");
        // Regular files and character devices like /dev/null cannot be in an epoll set.
        assert!(readiness.register(file.as_raw_fd()).is_err());
        let (socket, _peer) = UnixStream::pair().expect("socket pair");
        let token = readiness.register(socket.as_raw_fd()).expect("register after a refusal");
        readiness.deregister(token, socket.as_raw_fd());
    }
}
