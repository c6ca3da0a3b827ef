//! How a consumer group in clustering mode spreads a topic's queues over its
//! members: RocketMQ's AllocateMessageQueueAveragely and
//! AllocateMessageQueueAveragelyByCircle. Both are pure functions of the
//! sorted member list and the queue count, so every observer computes the
//! same answer, and every queue goes to exactly one member.

/// A group's allocation strategy.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub enum Strategy {
    /// Contiguous ranges, the first `queues % members` members one more:
    /// 4 queues over 2 members = [0,1] and [2,3]; 5 over 2 = [0,1,2] and [3,4].
    #[default]
    Averagely,
    /// Round robin: 4 queues over 2 members = [0,2] and [1,3].
    AveragelyByCircle,
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "averagely" => Ok(Strategy::Averagely),
            "averagely-by-circle" => Ok(Strategy::AveragelyByCircle),
            _ => Err(format!(
                "strategy must be averagely or averagely-by-circle, not {s:?}"
            )),
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Strategy::Averagely => "averagely",
            Strategy::AveragelyByCircle => "averagely-by-circle",
        })
    }
}

/// The queues member number `index` (0-based, in sorted member order) of
/// `members` gets out of `queues`. Members beyond the queue count get none.
pub fn allocate(strategy: Strategy, queues: u32, members: u32, index: u32) -> Vec<u32> {
    debug_assert!(index < members);
    if members == 0 || index >= members {
        return Vec::new();
    }
    match strategy {
        Strategy::Averagely => {
            let (n, m, i) = (queues, members, index);
            let rem = n % m;
            let size = if n <= m {
                1
            } else if i < rem {
                n / m + 1
            } else {
                n / m
            };
            let start = if i < rem { i * size } else { i * size + rem };
            let len = size.min(n.saturating_sub(start));
            (start..start + len).collect()
        }
        Strategy::AveragelyByCircle => (index..queues).step_by(members as usize).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_examples() {
        use Strategy::*;
        assert_eq!(allocate(Averagely, 4, 2, 0), vec![0, 1]);
        assert_eq!(allocate(Averagely, 4, 2, 1), vec![2, 3]);
        assert_eq!(allocate(Averagely, 5, 2, 0), vec![0, 1, 2]);
        assert_eq!(allocate(Averagely, 5, 2, 1), vec![3, 4]);
        assert_eq!(allocate(AveragelyByCircle, 4, 2, 0), vec![0, 2]);
        assert_eq!(allocate(AveragelyByCircle, 4, 2, 1), vec![1, 3]);
        // More members than queues: the extra ones idle.
        assert_eq!(allocate(Averagely, 2, 3, 2), Vec::<u32>::new());
        assert_eq!(allocate(AveragelyByCircle, 2, 3, 2), Vec::<u32>::new());
    }

    #[test]
    fn every_queue_has_exactly_one_member() {
        for strategy in [Strategy::Averagely, Strategy::AveragelyByCircle] {
            for queues in 0..20 {
                for members in 1..8 {
                    let mut all: Vec<u32> = (0..members)
                        .flat_map(|i| allocate(strategy, queues, members, i))
                        .collect();
                    all.sort_unstable();
                    assert_eq!(
                        all,
                        (0..queues).collect::<Vec<_>>(),
                        "{strategy} {queues}/{members}"
                    );
                }
            }
        }
    }

    #[test]
    fn names_parse() {
        assert_eq!("averagely".parse(), Ok(Strategy::Averagely));
        assert_eq!(
            "averagely-by-circle".parse(),
            Ok(Strategy::AveragelyByCircle)
        );
        assert!("round-robin".parse::<Strategy>().is_err());
    }
}
