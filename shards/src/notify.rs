//! A shard-local "something changed" signal: tasks wait, one call wakes them all.
//! Used for the log writer's "new data pending" and consumers' long polls.
//! `AnyNotified` waits on many signals at once (a fetch over many queues).
//! Single-threaded by construction (it lives inside one executor).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
pub struct Notify {
    generation: Cell<u64>,
    wakers: RefCell<Vec<Waker>>,
}

impl Notify {
    /// Wakes every task waiting now.
    pub fn notify_all(&self) {
        self.generation.set(self.generation.get() + 1);
        for w in self.wakers.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Completes at the next `notify_all` after this call.
    pub fn notified(&self) -> Notified<'_> {
        Notified {
            notify: self,
            seen: self.generation.get(),
        }
    }
}

pub struct Notified<'a> {
    notify: &'a Notify,
    seen: u64,
}

impl Future for Notified<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.notify.generation.get() != self.seen {
            return Poll::Ready(());
        }
        self.notify.wakers.borrow_mut().push(cx.waker().clone());
        Poll::Pending
    }
}

/// Completes at the first `notify_all` of any of `signals` after it was made:
/// a long poll over many queues waits on all their signals at once.
pub struct AnyNotified<'a> {
    signals: &'a [Rc<Notify>],
    seen: Vec<u64>,
    /// The waker already left with every signal (registered once, not on
    /// every poll: a many-queue wait would otherwise pile up wakers).
    registered: Option<Waker>,
}

impl<'a> AnyNotified<'a> {
    pub fn new(signals: &'a [Rc<Notify>]) -> AnyNotified<'a> {
        AnyNotified {
            seen: signals.iter().map(|s| s.generation.get()).collect(),
            signals,
            registered: None,
        }
    }
}

impl Future for AnyNotified<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let me = &mut *self;
        if me
            .signals
            .iter()
            .zip(&me.seen)
            .any(|(s, &seen)| s.generation.get() != seen)
        {
            return Poll::Ready(());
        }
        if !me
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            for s in me.signals {
                s.wakers.borrow_mut().push(cx.waker().clone());
            }
            me.registered = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn any_of_many_signals_wakes() {
        let signals: Vec<Rc<Notify>> = (0..3).map(|_| Rc::new(Notify::default())).collect();
        let mut any = AnyNotified::new(&signals);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(any.poll_unpin(&mut cx).is_pending());
        // A second poll with the same waker registers nothing more.
        assert!(any.poll_unpin(&mut cx).is_pending());
        assert_eq!(signals[2].wakers.borrow().len(), 1);
        signals[2].notify_all();
        assert!(any.poll_unpin(&mut cx).is_ready());
    }
}
