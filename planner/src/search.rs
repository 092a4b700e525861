//! The search itself: the largest value at which a yes/no property still holds, for a
//! property that holds below some knee and fails above it (a configuration meets its SLO up
//! to its capacity; it serves the target rate up to some number of adapters).
//!
//! [`find_knee`] is pure: it calls the probe it is given and nothing else, so it is tested on
//! synthetic curves without the simulator.
//!
//! # Algorithm
//!
//! 1. **Bracket.** Probe `start`. While the property holds, multiply by `step` (up to
//!    `ceiling`); while it fails, divide by `step` (down to `floor`). This ends with a value
//!    that holds (`lo`) next to one that fails (`hi`), or at a bound.
//! 2. **Bisect** at the geometric mean of `lo` and `hi` until `hi / lo <= 1 + granularity`
//!    (integers: also when `hi - lo <= 1`).
//!
//! The answer is `lo`, a value that was *probed and held*: the true knee lies in
//! `[lo, hi)`, so `lo` is never an extrapolation. Probes: about `log_step(start / knee) + 1`
//! to bracket and `log2(ln(step) / ln(1 + granularity))` to bisect (2 + 6 for a start within a
//! factor 2 of the knee, step 2 and 2% granularity).
//!
//! # Monotonicity
//!
//! For two properties A and B with A holding wherever B holds, the answer for A is never
//! below the one for B: both searches probe the same values until the first value where they
//! disagree (A holds, B fails), after which A's `lo` is at least that value and B's `hi` at
//! most it (tested by `monotone_inputs_give_monotone_outputs`).

use serde::{Deserialize, Serialize};

/// How a search proceeds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SearchSpec {
    /// First value probed; clamped into `[floor, ceiling]`.
    pub start: f64,
    /// Factor between probes while bracketing; `> 1`.
    pub step: f64,
    /// Bisection stops once `hi / lo <= 1 + granularity`; `> 0`.
    pub granularity: f64,
    /// Smallest value probed; `> 0`.
    pub floor: f64,
    /// Largest value probed; `>= floor`.
    pub ceiling: f64,
    /// Probe whole numbers only (adapter counts).
    pub integer: bool,
}

/// Where the knee is.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Knee {
    /// `lo` holds, `hi` fails, and they are within the granularity of each other.
    Between { lo: f64, hi: f64 },
    /// Even the ceiling held: the knee is at or above it.
    AtLeast { ceiling: f64 },
    /// Even the floor failed: the knee, if any, is below it.
    Below { floor: f64 },
}

impl Knee {
    /// The largest value probed that held, if any.
    pub fn value(&self) -> Option<f64> {
        match *self {
            Knee::Between { lo, .. } => Some(lo),
            Knee::AtLeast { ceiling } => Some(ceiling),
            Knee::Below { .. } => None,
        }
    }

    /// The smallest value probed that failed, if any.
    pub fn first_failure(&self) -> Option<f64> {
        match *self {
            Knee::Between { hi, .. } => Some(hi),
            Knee::AtLeast { .. } => None,
            Knee::Below { floor } => Some(floor),
        }
    }
}

/// One probe: the value, whether the property held there, and what the probe returned.
#[derive(Clone, Debug, PartialEq)]
pub struct Probe<T> {
    pub value: f64,
    pub holds: bool,
    pub detail: T,
}

/// A finished search: the knee and every probe in the order made.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchTrace<T> {
    pub knee: Knee,
    pub probes: Vec<Probe<T>>,
}

impl<T> SearchTrace<T> {
    /// The probe at the smallest value that failed (what breaks first above the knee).
    pub fn first_failing_probe(&self) -> Option<&Probe<T>> {
        self.probes
            .iter()
            .filter(|p| !p.holds)
            .min_by(|a, b| a.value.total_cmp(&b.value))
    }

    /// The probe at the knee's value, if it held there.
    pub fn knee_probe(&self) -> Option<&Probe<T>> {
        let v = self.knee.value()?;
        self.probes.iter().find(|p| p.holds && p.value == v)
    }
}

impl SearchSpec {
    /// The spec with every field made usable: `floor > 0`, `ceiling >= floor`, `step > 1`,
    /// `granularity > 0`, `start` inside the bounds (integers rounded). Callers validate user
    /// values first; this only keeps the loop finite whatever it is given.
    fn sanitized(&self) -> SearchSpec {
        let finite_or = |v: f64, d: f64| if v.is_finite() { v } else { d };
        let mut floor = finite_or(self.floor, 1.0).max(f64::MIN_POSITIVE);
        let mut ceiling = finite_or(self.ceiling, floor).max(floor);
        if self.integer {
            floor = floor.ceil().max(1.0);
            ceiling = ceiling.floor().max(floor);
        }
        let start = finite_or(self.start, floor).clamp(floor, ceiling);
        SearchSpec {
            start: if self.integer { start.round() } else { start },
            step: finite_or(self.step, 2.0).max(1.0 + 1e-6),
            granularity: finite_or(self.granularity, 0.02).max(1e-9),
            floor,
            ceiling,
            integer: self.integer,
        }
    }

    fn narrow_enough(&self, lo: f64, hi: f64) -> bool {
        hi <= lo * (1.0 + self.granularity) || (self.integer && hi - lo <= 1.0)
    }

    /// The next probe between `lo` and `hi` (exclusive): their geometric mean.
    fn midpoint(&self, lo: f64, hi: f64) -> f64 {
        let mid = (lo * hi).sqrt();
        if self.integer {
            mid.round().clamp(lo + 1.0, hi - 1.0)
        } else {
            mid
        }
    }

    /// One bracketing step up from `v` (at least one whole number for integers).
    fn up(&self, v: f64) -> f64 {
        let next = if self.integer {
            (v * self.step).round().max(v + 1.0)
        } else {
            v * self.step
        };
        next.min(self.ceiling)
    }

    fn down(&self, v: f64) -> f64 {
        let next = if self.integer {
            (v / self.step).round().min(v - 1.0)
        } else {
            v / self.step
        };
        next.max(self.floor)
    }
}

/// Finds the largest value at which `probe` holds, as the module documentation describes.
/// `probe(v)` returns whether the property holds at `v` and a detail kept in the trace; an
/// error from it ends the search.
pub fn find_knee<T, E>(
    spec: &SearchSpec,
    mut probe: impl FnMut(f64) -> Result<(bool, T), E>,
) -> Result<SearchTrace<T>, E> {
    let spec = spec.sanitized();
    let mut probes = Vec::new();
    let mut run = |v: f64, probes: &mut Vec<Probe<T>>| -> Result<bool, E> {
        let (holds, detail) = probe(v)?;
        probes.push(Probe {
            value: v,
            holds,
            detail,
        });
        Ok(holds)
    };

    // 1. Bracket.
    let mut v = spec.start;
    let (mut lo, mut hi);
    if run(v, &mut probes)? {
        loop {
            if v >= spec.ceiling {
                return Ok(SearchTrace {
                    knee: Knee::AtLeast { ceiling: v },
                    probes,
                });
            }
            let next = spec.up(v);
            if run(next, &mut probes)? {
                v = next;
            } else {
                (lo, hi) = (v, next);
                break;
            }
        }
    } else {
        loop {
            if v <= spec.floor {
                return Ok(SearchTrace {
                    knee: Knee::Below { floor: v },
                    probes,
                });
            }
            let next = spec.down(v);
            if run(next, &mut probes)? {
                (lo, hi) = (next, v);
                break;
            }
            v = next;
        }
    }

    // 2. Bisect.
    while !spec.narrow_enough(lo, hi) {
        let mid = spec.midpoint(lo, hi);
        if run(mid, &mut probes)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(SearchTrace {
        knee: Knee::Between { lo, hi },
        probes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::convert::Infallible;

    fn spec(start: f64) -> SearchSpec {
        SearchSpec {
            start,
            step: 2.0,
            granularity: 0.02,
            floor: 0.01,
            ceiling: 10_000.0,
            integer: false,
        }
    }

    fn threshold(knee: f64) -> impl FnMut(f64) -> Result<(bool, ()), Infallible> {
        move |v| Ok((v <= knee, ()))
    }

    #[test]
    fn bisection_finds_a_known_knee() {
        for start in [0.5, 7.0, 37.3, 40.0, 900.0] {
            let t = find_knee(&spec(start), threshold(37.3)).unwrap();
            let Knee::Between { lo, hi } = t.knee else {
                panic!("start {start}: {:?}", t.knee)
            };
            assert!(lo <= 37.3 && 37.3 < hi, "start {start}: [{lo}, {hi})");
            assert!(hi / lo <= 1.02 + 1e-12, "start {start}: [{lo}, {hi})");
            // The answer is a probed value that held; the bound a probed value that failed.
            assert!(t.probes.iter().any(|p| p.value == lo && p.holds));
            assert!(t.probes.iter().any(|p| p.value == hi && !p.holds));
            assert!(
                t.probes.len() <= 20,
                "start {start}: {} probes",
                t.probes.len()
            );
        }
    }

    /// A synthetic capacity curve like a simulation's: SLO attainment stays near 99% until
    /// the load nears capacity, then falls steeply; "meets" is attainment >= 90%.
    #[test]
    fn bisection_finds_the_knee_of_a_synthetic_capacity_curve() {
        let capacity = 24.5;
        let attainment = |rate: f64| 0.99 / (1.0 + ((rate - capacity) / 0.4).exp());
        // Attainment crosses 0.9 where exp((r - c)/0.4) = 0.1: r = c + 0.4 ln 0.1.
        let knee = capacity + 0.4 * 0.1f64.ln();
        let t = find_knee(&spec(10.0), |r| {
            Ok::<_, Infallible>((attainment(r) >= 0.9, ()))
        })
        .unwrap();
        let Knee::Between { lo, hi } = t.knee else {
            panic!("{:?}", t.knee)
        };
        assert!(lo <= knee && knee < hi, "[{lo}, {hi}) vs {knee}");
        assert!(hi / lo <= 1.02 + 1e-12);
    }

    #[test]
    fn bounds_are_reported_not_extrapolated() {
        let t = find_knee(&spec(5.0), threshold(1e9)).unwrap();
        assert_eq!(t.knee, Knee::AtLeast { ceiling: 10_000.0 });
        assert_eq!(t.knee.value(), Some(10_000.0));
        let t = find_knee(&spec(5.0), threshold(0.001)).unwrap();
        assert_eq!(t.knee, Knee::Below { floor: 0.01 });
        assert_eq!(t.knee.value(), None);
        assert_eq!(t.first_failing_probe().map(|p| p.value), Some(0.01));
    }

    #[test]
    fn integer_search_probes_whole_numbers_and_stops_at_neighbours() {
        let s = SearchSpec {
            start: 1000.0,
            step: 2.0,
            granularity: 0.0001,
            floor: 1.0,
            ceiling: 100_000.0,
            integer: true,
        };
        let t = find_knee(&s, |n| Ok::<_, Infallible>((n <= 2345.0, ()))).unwrap();
        assert_eq!(
            t.knee,
            Knee::Between {
                lo: 2345.0,
                hi: 2346.0
            }
        );
        assert!(t.probes.iter().all(|p| p.value.fract() == 0.0));
        // Small counts: the step never stalls below one whole number.
        let s = SearchSpec { start: 1.0, ..s };
        let t = find_knee(&s, |n| Ok::<_, Infallible>((n <= 3.0, ()))).unwrap();
        assert_eq!(t.knee, Knee::Between { lo: 3.0, hi: 4.0 });
    }

    #[test]
    fn probe_errors_end_the_search() {
        let r = find_knee(&spec(1.0), |v| {
            if v > 3.0 {
                Err("boom")
            } else {
                Ok((true, ()))
            }
        });
        assert_eq!(r.unwrap_err(), "boom");
    }

    #[test]
    fn nonsense_specs_still_terminate() {
        let s = SearchSpec {
            start: f64::NAN,
            step: 0.5,
            granularity: 0.0,
            floor: -3.0,
            ceiling: f64::INFINITY,
            integer: false,
        };
        let t = find_knee(&s, threshold(2.0)).unwrap();
        assert!(t.probes.len() < 3000);
    }

    fn rank(k: &Knee) -> (u8, f64) {
        match *k {
            Knee::Below { .. } => (0, 0.0),
            Knee::Between { lo, .. } => (1, lo),
            Knee::AtLeast { ceiling } => (2, ceiling),
        }
    }

    proptest! {
        /// A property that holds wherever another holds never gets a lower answer.
        #[test]
        fn monotone_inputs_give_monotone_outputs(
            a in 0.001f64..20_000.0,
            b in 0.001f64..20_000.0,
            start in 0.01f64..10_000.0,
            step in 1.05f64..4.0,
            granularity in 0.001f64..0.3,
            integer in any::<bool>(),
        ) {
            let (k1, k2) = if a <= b { (a, b) } else { (b, a) };
            let s = SearchSpec { start, step, granularity, floor: 0.01, ceiling: 10_000.0, integer };
            let low = find_knee(&s, threshold(k1)).unwrap();
            let high = find_knee(&s, threshold(k2)).unwrap();
            prop_assert!(rank(&low.knee) <= rank(&high.knee), "{:?} vs {:?}", low.knee, high.knee);
            // And each answer brackets its own knee.
            for (k, t) in [(k1, &low), (k2, &high)] {
                if let Knee::Between { lo, hi } = t.knee {
                    prop_assert!(lo <= k && k < hi);
                    prop_assert!(hi <= lo * (1.0 + granularity) + 1e-9 || (integer && hi - lo <= 1.0));
                }
            }
        }
    }
}
