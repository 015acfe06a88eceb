//! One budget for everything the router keeps outside workers' queues.
//!
//! A worker's queue is bounded per auction, but the router also keeps bids for auctions it
//! does not judge right now: the shadow of each auction another server holds (for a
//! handover) and the work waiting while a close of an auction nobody held is in flight.
//! Each of those is bounded per auction; over all auctions only this [`Budget`] bounds
//! them, so memory does not grow with the number of auctions in that state. A [`Kept`]
//! queue charges the budget for every item it holds and gives it back when items leave it
//! or it is dropped, so the count stays right however the router replaces its slots. The
//! count is the `auction_router_kept_bids` gauge itself, exact at every scrape.

use std::collections::VecDeque;
use std::collections::vec_deque::IntoIter;

use prometheus_client::metrics::gauge::Gauge;

/// A cap shared by many [`Kept`] queues; clones share the count.
#[derive(Clone, Debug)]
pub struct Budget {
    used: Gauge,
    cap: usize,
}

impl Budget {
    /// A budget of `cap` items, counted on `used`.
    pub fn new(cap: usize, used: Gauge) -> Self {
        Self { used, cap }
    }

    /// Items held now, over all queues.
    pub fn used(&self) -> usize {
        usize::try_from(self.used.get()).unwrap_or(0)
    }

    /// True while another item fits.
    pub fn has_room(&self) -> bool {
        self.used() < self.cap
    }
}

/// A FIFO queue whose items count against a [`Budget`].
#[derive(Debug)]
pub struct Kept<T> {
    items: VecDeque<T>,
    budget: Budget,
}

impl<T> Kept<T> {
    /// An empty queue charging `budget`.
    pub fn new(budget: &Budget) -> Self {
        Self {
            items: VecDeque::new(),
            budget: budget.clone(),
        }
    }

    /// True while the shared budget has room for another item.
    pub fn has_room(&self) -> bool {
        self.budget.has_room()
    }

    /// Appends `item` if the budget has room; hands it back otherwise.
    pub fn try_push(&mut self, item: T) -> Result<(), T> {
        if !self.has_room() {
            return Err(item);
        }
        self.push(item);
        Ok(())
    }

    /// Appends `item` whatever the budget (for the few items that must not be refused:
    /// admin requests, each a caller waiting on a bounded gRPC call).
    pub fn push(&mut self, item: T) {
        self.items.push_back(item);
        self.budget.used.inc();
    }

    /// Removes the oldest item.
    pub fn pop_front(&mut self) -> Option<T> {
        let item = self.items.pop_front();
        if item.is_some() {
            self.budget.used.dec();
        }
        item
    }

    /// The oldest item.
    pub fn front(&self) -> Option<&T> {
        self.items.front()
    }

    /// The newest item.
    pub fn back(&self) -> Option<&T> {
        self.items.back()
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Takes every item out, in order, giving their share of the budget back.
    pub fn take_all(mut self) -> IntoIter<T> {
        let items = std::mem::take(&mut self.items);
        self.budget.used.dec_by(items.len() as i64);
        items.into_iter()
    }
}

impl<T> Drop for Kept<T> {
    fn drop(&mut self) {
        self.budget.used.dec_by(self.items.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_share_one_cap_and_give_back_what_leaves_them() {
        let budget = Budget::new(3, Gauge::default());
        let mut a = Kept::new(&budget);
        let mut b = Kept::new(&budget);
        assert_eq!(a.try_push(1), Ok(()));
        assert_eq!(a.try_push(2), Ok(()));
        assert_eq!(b.try_push(10), Ok(()));
        assert_eq!(b.try_push(11), Err(11), "the cap is over all queues");
        assert_eq!(a.pop_front(), Some(1));
        assert_eq!(b.try_push(11), Ok(()));
        assert_eq!(budget.used(), 3);
        assert_eq!(b.take_all().collect::<Vec<_>>(), vec![10, 11]);
        assert_eq!(budget.used(), 1);
        drop(a);
        assert_eq!(budget.used(), 0, "a dropped queue gives its items back");
    }

    #[test]
    fn forced_pushes_are_counted_too() {
        let budget = Budget::new(1, Gauge::default());
        let mut q = Kept::new(&budget);
        q.push("open");
        q.push("close");
        assert!(!q.has_room());
        assert_eq!(q.len(), 2);
        drop(q);
        assert!(budget.has_room());
    }
}
