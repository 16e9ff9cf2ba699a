//! The throughput targets, checked against a bench report
//! (`cardvault-bench --check-targets`).
//!
//! The targets hold on a 2-core machine with the client on it, 64
//! concurrent clients, mTLS and durable writes. By default: tokenize at
//! least 50% of the no-op baseline's throughput, detokenize at least 80%,
//! and the vault's p99 latency at most 5 ms for both; each bound is a flag
//! ([`Limits`]). Each is judged on the
//! median round (so `--rounds 3` judges the middle round, not the best
//! one), and a run with failed requests in any round misses, since errors
//! can make a server look fast. A run under other conditions is still checked, but
//! the report names how it differs, so a figure from an 8-core machine is
//! not mistaken for one from the machine the targets are for.

use serde::Serialize;

use super::{BenchOp, Report};

/// Default `--target-p99-ms`: most milliseconds a tokenize or detokenize
/// may take at the 99th percentile.
pub(super) const P99_MAX_MS: f64 = 5.0;
/// Default `--target-tokenize-ratio`: least tokenize throughput as a share
/// of the no-op baseline's.
pub(super) const TOKENIZE_RATIO: f64 = 0.5;
/// Default `--target-detokenize-ratio`: the same for detokenize.
pub(super) const DETOKENIZE_RATIO: f64 = 0.8;
/// Concurrent clients the targets are defined for.
pub(super) const CONCURRENCY: usize = 64;
/// Cores of the machine the targets are defined for.
pub(super) const CORES: usize = 2;

/// The bounds checked (flags `--target-*`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Limits {
    /// Least tokenize throughput as a share of the no-op baseline's.
    pub tokenize_ratio: f64,
    /// Least detokenize throughput as a share of the no-op baseline's.
    pub detokenize_ratio: f64,
    /// Most milliseconds at the 99th percentile, for both.
    pub p99_ms: f64,
}

impl Limits {
    /// The least ratio for `op`, if it has a target.
    fn min_ratio(&self, op: BenchOp) -> Option<f64> {
        match op {
            BenchOp::Tokenize => Some(self.tokenize_ratio),
            BenchOp::Detokenize => Some(self.detokenize_ratio),
            BenchOp::Metadata | BenchOp::Mix | BenchOp::All => None,
        }
    }
}

/// What a check compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    /// Vault ops/s over no-op baseline ops/s; met when at least the limit.
    Ratio,
    /// The vault's 99th percentile latency; met when at most the limit.
    P99Ms,
    /// Failed requests against the vault and the baseline; met when none.
    Errors,
}

/// One target, checked.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// The operation.
    pub op: BenchOp,
    /// What was compared.
    pub measure: Measure,
    /// The median round's figure (a ratio as a fraction, p99 in ms,
    /// errors as a count).
    pub value: f64,
    /// The target's bound.
    pub limit: f64,
    /// Whether the target is met.
    pub met: bool,
}

/// The targets checked against a report.
#[derive(Debug, Clone, Serialize)]
pub struct Targets {
    /// One check per target of each measured operation that has one.
    pub checks: Vec<Check>,
    /// How the run's conditions differ from the targets' (empty if not).
    pub conditions: Vec<String>,
}

impl Targets {
    /// Checks every target of the operations in `report` against `limits`.
    pub fn check(report: &Report, limits: &Limits) -> Targets {
        let mut checks = Vec::new();
        for res in &report.results {
            let Some(min) = limits.min_ratio(res.op) else {
                continue;
            };
            let mut check = |measure, value: f64, limit, met| {
                checks.push(Check {
                    op: res.op,
                    measure,
                    value,
                    limit,
                    met,
                });
            };
            // No baseline means no ratio: a missed target, not a pass.
            let ratio = res.ratio.unwrap_or(0.0);
            check(Measure::Ratio, ratio, min, ratio >= min);
            let p99 = res.vault.p99_ms;
            check(Measure::P99Ms, p99, limits.p99_ms, p99 <= limits.p99_ms);
            // Every round's errors, not only the median round's.
            let errors: u64 = res
                .rounds
                .iter()
                .map(|r| r.vault.errors + r.baseline.as_ref().map_or(0, |b| b.errors))
                .sum();
            check(Measure::Errors, errors as f64, 0.0, errors == 0);
        }
        let mut conditions = Vec::new();
        if report.concurrency != CONCURRENCY {
            conditions.push(format!(
                "{} concurrent clients, not {CONCURRENCY}",
                report.concurrency
            ));
        }
        if report.cores != CORES {
            conditions.push(format!("{} cores, not {CORES}", report.cores));
        }
        Targets { checks, conditions }
    }

    /// The checks that missed, as `op measure` names.
    pub fn missed(&self) -> Vec<String> {
        self.checks
            .iter()
            .filter(|c| !c.met)
            .map(|c| format!("{} {}", c.op.name(), c.measure.name()))
            .collect()
    }

    /// Prints one line per check, and the differing conditions.
    pub fn print(&self) {
        for c in &self.checks {
            let (value, bound) = match c.measure {
                Measure::Ratio => (
                    format!("{:.1}%", c.value * 100.0),
                    format!(">= {:.0}% of baseline", c.limit * 100.0),
                ),
                Measure::P99Ms => (format!("{:.2} ms", c.value), format!("<= {} ms", c.limit)),
                Measure::Errors => (format!("{}", c.value), "= 0".to_owned()),
            };
            let verdict = if c.met { "met" } else { "MISSED" };
            println!(
                "{:<11} {:<12} {:<7} {value:>9}  {bound:<20}  {verdict}",
                c.op.name(),
                "target",
                c.measure.name(),
            );
        }
        for c in &self.conditions {
            println!("{:<11} {:<12} conditions differ: {c}", "", "target");
        }
    }
}

impl Measure {
    fn name(self) -> &'static str {
        match self {
            Measure::Ratio => "ratio",
            Measure::P99Ms => "p99",
            Measure::Errors => "errors",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::OpResult;
    use super::super::tests::round;
    use super::*;

    fn report(results: Vec<OpResult>) -> Report {
        Report {
            addr: "https://127.0.0.1:7443".into(),
            concurrency: CONCURRENCY,
            connections: 4,
            duration_s: 10.0,
            count: None,
            warmup_s: 2.0,
            rounds: 1,
            tenant: "demo".into(),
            cores: CORES,
            results,
            targets: None,
        }
    }

    fn op(op: BenchOp, vault: f64, baseline: f64, p99_ms: f64) -> OpResult {
        let mut r = round(vault, Some(baseline));
        r.vault.p99_ms = p99_ms;
        OpResult::of(op, vec![r])
    }

    const DEFAULTS: Limits = Limits {
        tokenize_ratio: TOKENIZE_RATIO,
        detokenize_ratio: DETOKENIZE_RATIO,
        p99_ms: P99_MAX_MS,
    };

    fn verdicts(t: &Targets) -> Vec<(BenchOp, Measure, bool)> {
        t.checks.iter().map(|c| (c.op, c.measure, c.met)).collect()
    }

    #[test]
    fn each_target_is_met_at_its_bound_and_missed_beyond() {
        let t = Targets::check(
            &report(vec![
                op(BenchOp::Tokenize, 50.0, 100.0, 5.0),
                op(BenchOp::Detokenize, 80.0, 100.0, 5.0),
            ]),
            &DEFAULTS,
        );
        use Measure::*;
        assert_eq!(
            verdicts(&t),
            [
                (BenchOp::Tokenize, Ratio, true),
                (BenchOp::Tokenize, P99Ms, true),
                (BenchOp::Tokenize, Errors, true),
                (BenchOp::Detokenize, Ratio, true),
                (BenchOp::Detokenize, P99Ms, true),
                (BenchOp::Detokenize, Errors, true),
            ]
        );
        assert!(t.missed().is_empty() && t.conditions.is_empty());

        // Just short of each bound: the detokenize ratio (79%) and the
        // tokenize p99 (5.01 ms) miss.
        let t = Targets::check(
            &report(vec![
                op(BenchOp::Tokenize, 60.0, 100.0, 5.01),
                op(BenchOp::Detokenize, 79.0, 100.0, 1.0),
            ]),
            &DEFAULTS,
        );
        assert_eq!(t.missed(), ["tokenize p99", "detokenize ratio"]);
        let ratio = &t.checks[3];
        assert_eq!((ratio.value, ratio.limit), (0.79, 0.8));
    }

    #[test]
    fn failed_requests_in_any_round_or_no_baseline_miss() {
        let mut detok = op(BenchOp::Detokenize, 90.0, 100.0, 1.0);
        detok.rounds[0].baseline.as_mut().unwrap().errors = 3;
        let t = Targets::check(&report(vec![detok]), &DEFAULTS);
        assert_eq!(t.missed(), ["detokenize errors"]);
        assert_eq!(t.checks[2].value, 3.0);

        let mut tok = op(BenchOp::Tokenize, 90.0, 100.0, 1.0);
        tok.rounds[0].vault.errors = 1;
        assert_eq!(
            Targets::check(&report(vec![tok]), &DEFAULTS).missed(),
            ["tokenize errors"]
        );

        // An error in a round that is not the median one counts too.
        let mut rounds = vec![
            round(85.0, Some(100.0)),
            round(90.0, Some(100.0)),
            round(95.0, Some(100.0)),
        ];
        rounds[2].vault.errors = 2;
        let res = OpResult::of(BenchOp::Detokenize, rounds);
        assert_eq!(res.vault.errors, 0, "the median round had none");
        let t = Targets::check(&report(vec![res]), &DEFAULTS);
        assert_eq!(t.missed(), ["detokenize errors"]);

        let alone = OpResult::of(BenchOp::Tokenize, vec![round(90.0, None)]);
        assert_eq!(
            Targets::check(&report(vec![alone]), &DEFAULTS).missed(),
            ["tokenize ratio"]
        );
    }

    #[test]
    fn the_bounds_are_the_limits_given() {
        let res = vec![op(BenchOp::Tokenize, 40.0, 100.0, 8.0)];
        assert_eq!(
            Targets::check(&report(res.clone()), &DEFAULTS).missed(),
            ["tokenize ratio", "tokenize p99"]
        );
        let looser = Limits {
            tokenize_ratio: 0.4,
            p99_ms: 8.0,
            ..DEFAULTS
        };
        let t = Targets::check(&report(res), &looser);
        assert!(t.missed().is_empty());
        assert_eq!((t.checks[0].limit, t.checks[1].limit), (0.4, 8.0));
    }

    #[test]
    fn only_tokenize_and_detokenize_have_targets() {
        let t = Targets::check(
            &report(vec![
                op(BenchOp::Metadata, 1.0, 100.0, 50.0),
                op(BenchOp::Mix, 1.0, 100.0, 50.0),
            ]),
            &DEFAULTS,
        );
        assert!(t.checks.is_empty());
    }

    #[test]
    fn the_median_round_is_judged_not_the_best() {
        // Ratios 0.85, 0.70, 0.75: the median round (0.75) misses 80%.
        let rounds = vec![
            round(85.0, Some(100.0)),
            round(70.0, Some(100.0)),
            round(75.0, Some(100.0)),
        ];
        let res = OpResult::of(BenchOp::Detokenize, rounds);
        let t = Targets::check(&report(vec![res]), &DEFAULTS);
        assert_eq!(t.checks[0].value, 0.75);
        assert_eq!(t.missed(), ["detokenize ratio"]);
    }

    #[test]
    fn other_conditions_are_named() {
        let mut r = report(vec![op(BenchOp::Tokenize, 60.0, 100.0, 1.0)]);
        r.concurrency = 32;
        r.cores = 8;
        let t = Targets::check(&r, &DEFAULTS);
        assert_eq!(
            t.conditions,
            ["32 concurrent clients, not 64", "8 cores, not 2"]
        );
        assert!(t.missed().is_empty(), "still checked");
    }
}
