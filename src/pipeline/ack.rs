//! The acknowledgement path. A batch of changes may end inside a
//! transaction; the slot may only be acknowledged up to the end of the last
//! transaction whose every change has been flushed by every sink. This module
//! is that arithmetic, kept apart from I/O so it can be tested exhaustively.

/// What a batch contributes to the slot's flush position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchAck {
    /// End LSN of the last transaction that finished inside the batch.
    pub last_commit_end: Option<u64>,
    /// Server position with nothing in flight (keepalive while idle).
    pub idle_wal_end: Option<u64>,
    /// Whether the batch ends inside an open transaction.
    pub open_tx: bool,
}

/// The flush LSN reported to PostgreSQL: it only moves forward, and only to
/// positions that every sink has flushed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushedLsn(pub u64);

impl FlushedLsn {
    /// Advances past a batch every sink has flushed. Returns the new value
    /// when it moved.
    pub fn advance(&mut self, ack: &BatchAck) -> Option<u64> {
        let mut target = ack.last_commit_end.unwrap_or(0);
        if !ack.open_tx {
            target = target.max(ack.idle_wal_end.unwrap_or(0));
        }
        if target > self.0 {
            self.0 = target;
            Some(target)
        } else {
            None
        }
    }
}

/// The slowest sink decides: the minimum of per-sink flushed positions.
pub fn min_flushed(per_sink: &[u64]) -> u64 {
    per_sink.iter().copied().min().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn open_transaction_blocks_idle_advance() {
        let mut f = FlushedLsn(100);
        assert_eq!(
            f.advance(&BatchAck { last_commit_end: Some(150), idle_wal_end: Some(900), open_tx: true }),
            Some(150)
        );
        assert_eq!(f.advance(&BatchAck { last_commit_end: None, idle_wal_end: Some(900), open_tx: false }), Some(900));
        assert_eq!(f.advance(&BatchAck { last_commit_end: Some(500), idle_wal_end: None, open_tx: false }), None);
        assert_eq!(f.0, 900);
    }

    proptest! {
        #[test]
        fn never_goes_backwards(acks in proptest::collection::vec((proptest::option::of(0u64..1000), proptest::option::of(0u64..1000), any::<bool>()), 0..50)) {
            let mut f = FlushedLsn(0);
            let mut prev = 0;
            for (c, i, o) in acks {
                f.advance(&BatchAck { last_commit_end: c, idle_wal_end: i, open_tx: o });
                prop_assert!(f.0 >= prev);
                prev = f.0;
            }
        }

        #[test]
        fn min_is_a_lower_bound(v in proptest::collection::vec(0u64..u64::MAX, 1..10)) {
            let m = min_flushed(&v);
            prop_assert!(v.iter().all(|x| *x >= m));
            prop_assert!(v.contains(&m));
        }
    }
}
