//! Tiny single-threaded synchronisation for tasks of one shard (one glommio executor).
//! Nothing here is `Send`: it never crosses shards.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// Wakes every task waiting on it. A wait started before a notification completes even if
/// it is polled only after it (the generation is captured when `wait` is called).
#[derive(Debug, Default)]
pub(crate) struct Notify {
    generation: Cell<u64>,
    wakers: RefCell<Vec<Waker>>,
}

impl Notify {
    pub(crate) fn notify_all(&self) {
        self.generation.set(self.generation.get().wrapping_add(1));
        let wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        for waker in wakers {
            waker.wake();
        }
    }

    pub(crate) fn wait(&self) -> NotifyWait<'_> {
        NotifyWait { notify: self, generation: self.generation.get() }
    }
}

#[derive(Debug)]
pub(crate) struct NotifyWait<'a> {
    notify: &'a Notify,
    generation: u64,
}

impl Future for NotifyWait<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<()> {
        if self.notify.generation.get() != self.generation {
            return Poll::Ready(());
        }
        self.notify.wakers.borrow_mut().push(context.waker().clone());
        Poll::Pending
    }
}

/// Set once, read by many: the outcome of one WAL batch.
#[derive(Debug)]
pub(crate) struct Latch<T: Clone> {
    value: RefCell<Option<T>>,
    wakers: RefCell<Vec<Waker>>,
}

impl<T: Clone> Latch<T> {
    pub(crate) fn new() -> Rc<Self> {
        Rc::new(Self { value: RefCell::new(None), wakers: RefCell::new(Vec::new()) })
    }

    /// Sets the value (the first set wins) and wakes every waiter.
    pub(crate) fn set(&self, value: T) {
        {
            let mut slot = self.value.borrow_mut();
            if slot.is_some() {
                return;
            }
            *slot = Some(value);
        }
        let wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        for waker in wakers {
            waker.wake();
        }
    }

    pub(crate) fn wait(self: &Rc<Self>) -> LatchWait<T> {
        LatchWait { latch: Rc::clone(self), registered: false }
    }
}

#[derive(Debug)]
pub(crate) struct LatchWait<T: Clone> {
    latch: Rc<Latch<T>>,
    registered: bool,
}

impl<T: Clone> Future for LatchWait<T> {
    type Output = T;
    fn poll(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<T> {
        if let Some(value) = self.latch.value.borrow().as_ref() {
            return Poll::Ready(value.clone());
        }
        // Latches are set once and all wakers drained then: one registration suffices
        // unless the task moved to another waker, which glommio tasks never do.
        if !self.registered {
            self.latch.wakers.borrow_mut().push(context.waker().clone());
            self.registered = true;
        }
        Poll::Pending
    }
}
