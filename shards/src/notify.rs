//! A shard-local "something changed" signal: tasks wait, one call wakes them all.
//! Used for the log writer's "new data pending" and consumers' long polls.
//! `ReadySet` watches many signals at once and says which fired (a fetch
//! over many queues).
//! Single-threaded by construction (it lives inside one executor).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, Waker};

#[derive(Default)]
pub struct Notify {
    generation: Cell<u64>,
    wakers: RefCell<Vec<Waker>>,
    /// Ready sets watching this signal, each with the index it goes by there.
    watchers: RefCell<Vec<(Weak<Ready>, usize)>>,
}

impl Notify {
    /// Wakes every task waiting now and tells every watching ready set.
    pub fn notify_all(&self) {
        self.generation.set(self.generation.get() + 1);
        for w in self.wakers.borrow_mut().drain(..) {
            w.wake();
        }
        let watchers = std::mem::take(&mut *self.watchers.borrow_mut());
        for (set, index) in watchers {
            if let Some(set) = set.upgrade() {
                set.fire(index);
            }
        }
    }

    /// Completes at the next `notify_all` after this call.
    pub fn notified(&self) -> Notified<'_> {
        Notified {
            notify: self,
            seen: self.generation.get(),
            registered: None,
        }
    }
}

pub struct Notified<'a> {
    notify: &'a Notify,
    seen: u64,
    /// The waker left with the signal, taken back if this future is
    /// dropped first: a long poll that times out on an idle queue would
    /// otherwise leave one waker (and its task's memory) per poll.
    registered: Option<Waker>,
}

impl Future for Notified<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.notify.generation.get() != self.seen {
            self.registered = None;
            return Poll::Ready(());
        }
        if !self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            self.notify.wakers.borrow_mut().push(cx.waker().clone());
            self.registered = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl Drop for Notified<'_> {
    fn drop(&mut self) {
        let Some(mine) = self.registered.take() else {
            return;
        };
        if self.notify.generation.get() != self.seen {
            return; // fired: `notify_all` took the wakers
        }
        let mut wakers = self.notify.wakers.borrow_mut();
        if let Some(at) = wakers.iter().position(|w| w.will_wake(&mine)) {
            wakers.swap_remove(at);
        }
    }
}

/// Which of many signals fired: a long poll over many queues watches all
/// of them and then looks again only at the queues that got data, instead
/// of passing over every queue at each wake (1,024 per FetchMany).
///
/// A watch hears of one `notify_all` (watch the signal again for the
/// next). A set that is dropped leaves weak entries in the signals it
/// watched; a signal drops them when it fires or when it is watched again,
/// so an idle queue polled over and over does not collect them.
#[derive(Default)]
pub struct ReadySet {
    ready: Rc<Ready>,
}

#[derive(Default)]
struct Ready {
    /// Indices (as given to `watch`) of the signals that fired, in order.
    fired: RefCell<Vec<usize>>,
    waker: RefCell<Option<Waker>>,
}

impl Ready {
    fn fire(&self, index: usize) {
        self.fired.borrow_mut().push(index);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

impl ReadySet {
    /// Hears of `signal`'s next `notify_all`, as `index`.
    pub fn watch(&self, signal: &Notify, index: usize) {
        let mut watchers = signal.watchers.borrow_mut();
        watchers.retain(|(set, _)| set.strong_count() > 0);
        watchers.push((Rc::downgrade(&self.ready), index));
    }

    /// The indices that fired since the last call, in the order they fired.
    pub fn take(&self) -> Vec<usize> {
        std::mem::take(&mut *self.ready.fired.borrow_mut())
    }

    /// Completes once some watched signal has fired (at once if one has).
    pub fn fired(&self) -> Fired<'_> {
        Fired { set: self }
    }
}

pub struct Fired<'a> {
    set: &'a ReadySet,
}

impl Future for Fired<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let ready = &self.set.ready;
        if !ready.fired.borrow().is_empty() {
            return Poll::Ready(());
        }
        *ready.waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Fired<'_> {
    /// A set outlives its waits (a fetch session keeps it between polls):
    /// a signal that fires later must not wake, or keep alive, a finished task.
    fn drop(&mut self) {
        self.set.ready.waker.borrow_mut().take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn a_ready_set_says_which_signals_fired_once_per_watch() {
        let signals: Vec<Rc<Notify>> = (0..3).map(|_| Rc::new(Notify::default())).collect();
        let set = ReadySet::default();
        for (i, s) in signals.iter().enumerate() {
            set.watch(s, i);
        }
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(set.fired().poll_unpin(&mut cx).is_pending());
        signals[2].notify_all();
        signals[0].notify_all();
        // Fired again without a new watch: not heard.
        signals[2].notify_all();
        assert!(set.fired().poll_unpin(&mut cx).is_ready());
        assert_eq!(set.take(), [2, 0]);
        assert!(set.fired().poll_unpin(&mut cx).is_pending());
        set.watch(&signals[2], 2);
        signals[2].notify_all();
        assert_eq!(set.take(), [2]);
    }

    #[test]
    fn a_wait_given_up_takes_its_waker_back() {
        let idle = Notify::default();
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        for _ in 0..100 {
            let mut n = idle.notified();
            assert!(n.poll_unpin(&mut cx).is_pending());
            // Polled again by the same task: still one waker.
            assert!(n.poll_unpin(&mut cx).is_pending());
            assert_eq!(idle.wakers.borrow().len(), 1);
        }
        assert!(idle.wakers.borrow().is_empty());
        let mut a = idle.notified();
        let mut b = idle.notified();
        assert!(a.poll_unpin(&mut cx).is_pending());
        assert!(b.poll_unpin(&mut cx).is_pending());
        drop(a);
        // The other wait of the same task keeps its own waker.
        assert_eq!(idle.wakers.borrow().len(), 1);
        idle.notify_all();
        assert!(b.poll_unpin(&mut cx).is_ready());
    }

    #[test]
    fn a_dropped_set_leaves_nothing_behind_in_an_idle_signal() {
        let idle = Notify::default();
        for _ in 0..100 {
            let set = ReadySet::default();
            set.watch(&idle, 0);
        }
        let live = ReadySet::default();
        live.watch(&idle, 7);
        assert_eq!(idle.watchers.borrow().len(), 1);
        idle.notify_all();
        assert_eq!(live.take(), [7]);
    }
}
