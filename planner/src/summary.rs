//! The plan in plain language, for the terminal: what to buy, what it sustains, and what
//! breaks first as traffic or the adapter population grows.

use crate::evaluate::Bottleneck;
use crate::plan::{short, Breaking, Candidate, PlanResult, Role, Verdict};
use slora_sim::cost::Provenance;
use std::fmt::Write as _;

/// A ratio with two decimals (`1.40`).
fn times(x: f64) -> String {
    format!("{x:.2}")
}

fn usd(x: f64) -> String {
    format!("${x:.2}")
}

/// `1,234`.
pub fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn provenance(p: Option<Provenance>) -> &'static str {
    match p {
        Some(Provenance::Calibrated) => "calibrated",
        Some(Provenance::Derived) => "derived",
        Some(Provenance::Executed) => "executed",
        None => "unlabelled",
    }
}

/// `TTFT ≤ 6 s, attainment ≥ 90%`.
pub fn slo_text(r: &PlanResult) -> String {
    let mut parts: Vec<String> = [
        ("TTFT", r.slo.ttft_s),
        ("TPOT", r.slo.tpot_s),
        ("E2E", r.slo.e2e_s),
    ]
    .iter()
    .filter_map(|(n, v)| v.map(|v| format!("{n} ≤ {} s", short(v))))
    .collect();
    parts.push(format!(
        "attainment ≥ {}%",
        short(r.slo.attainment_target * 100.0)
    ));
    parts.join(", ")
}

fn breaking(b: &Breaking) -> String {
    format!(
        "{} — {} (SLO attainment {}%)",
        b.bottleneck.map_or("unclear", Bottleneck::label),
        b.detail,
        short(b.slo_attainment * 100.0)
    )
}

fn adapters_text(c: &Candidate) -> String {
    match c.max_adapters_at_target {
        Some(n) if c.max_adapters_is_lower_bound => {
            format!(
                "at least {} adapters (the search's ceiling)",
                group(n as u64)
            )
        }
        Some(n) => format!("up to {} adapters", group(n as u64)),
        None => "the target adapter count".to_string(),
    }
}

fn rate_text(c: &Candidate) -> String {
    match c.max_rate {
        Some(r) if c.max_rate_is_lower_bound => format!("at least {} req/s", short(r)),
        Some(r) => format!("{} req/s", short(r)),
        None => "no rate".to_string(),
    }
}

/// What a deployment that meets the target with a highest meeting rate below it means: the
/// evaluation at exactly the target met, the bisection's did not just above its lower bound,
/// so the target lies inside the capacity bracket `[max_rate, max_rate × (1 + granularity))`
/// and the deployment runs at its knee. `None` when there is headroom (or no rate).
pub fn knee_note(c: &Candidate, target: f64, granularity: f64) -> Option<String> {
    let rate = c.max_rate?;
    if !c.meets_target || c.max_rate_is_lower_bound || rate >= target {
        return None;
    }
    Some(format!(
        "No headroom: its capacity lies between {} and {} req/s, and the target is inside \
         that bracket; it met the SLO at exactly the target, but any more traffic, or a \
         slower GPU than the one costed, misses it.",
        short(rate),
        short(rate * (1.0 + granularity))
    ))
}

/// The terminal summary of a plan.
pub fn summary_text(r: &PlanResult) -> String {
    let mut out = String::new();
    let t = &r.targets;
    let _ = writeln!(
        out,
        "Plan for {}: {} req/s with {} adapters; SLO {}.",
        r.scenario,
        short(t.rate),
        group(t.adapters as u64),
        slo_text(r)
    );
    let s = &r.search;
    let deployments = r
        .candidates
        .iter()
        .filter(|c| c.role == Role::Deployment)
        .count();
    let _ = writeln!(
        out,
        "Searched GPUs {} × TP {:?} × 1–{} replicas ({} router{}) × {} knob combination{}: {} \
         deployments, {} simulations of {} s, rates to {}%.",
        s.gpus.join(", "),
        s.tensor_parallel,
        s.max_replicas,
        s.routers
            .iter()
            .map(|r| r.name())
            .collect::<Vec<_>>()
            .join(", "),
        if s.routers.len() == 1 { "" } else { "s" },
        s.knob_combinations,
        if s.knob_combinations == 1 { "" } else { "s" },
        deployments,
        group(r.simulations),
        short(s.duration_s),
        short(s.granularity * 100.0),
    );
    out.push('\n');

    match &r.verdict {
        Verdict::Recommended => {
            let top = &r.recommendations[0];
            let c = &r.candidates[top.candidate];
            let _ = writeln!(
                out,
                "Buy: {} — {} GPU{}, {}/hour{} [{} costs].",
                c.label(),
                c.gpus,
                if c.gpus == 1 { "" } else { "s" },
                usd(c.usd_per_hour),
                c.usd_per_million_output_tokens
                    .map(|x| format!(", {} per million output tokens", usd(x)))
                    .unwrap_or_default(),
                provenance(c.provenance)
            );
            let _ = writeln!(
                out,
                "  Sustains {} within the SLO ({}× the target); serves {} at the target rate.",
                rate_text(c),
                times(c.headroom.unwrap_or(0.0)),
                adapters_text(c)
            );
            if let Some(note) = knee_note(c, t.rate, s.granularity) {
                let _ = writeln!(out, "  {note}");
            }
            let _ = writeln!(out, "  Knobs: {}.", c.knobs_text);
            if r.recommendations.len() > 1 {
                out.push_str("\nAlternatives:\n");
                for rec in &r.recommendations[1..] {
                    let c = &r.candidates[rec.candidate];
                    let _ = writeln!(
                        out,
                        "  {}. {}, {} GPU{} — {}/hour, {} ({}× the target), {} [{}]",
                        rec.rank,
                        c.label(),
                        c.gpus,
                        if c.gpus == 1 { "" } else { "s" },
                        usd(c.usd_per_hour),
                        rate_text(c),
                        times(c.headroom.unwrap_or(0.0)),
                        c.knobs_text,
                        provenance(c.provenance)
                    );
                }
            }
            out.push_str("\nWhat breaks first as it grows:\n");
            match &c.breaks_first {
                Some(b) => {
                    let _ = writeln!(out, "  - traffic past {}: {}", rate_text(c), breaking(b));
                }
                None => {
                    let _ = writeln!(
                        out,
                        "  - traffic: nothing up to the search's ceiling of {} req/s",
                        short(s.max_rate)
                    );
                }
            }
            match &c.adapters_break_first {
                Some(b) => {
                    let _ = writeln!(
                        out,
                        "  - adapters past {} at {} req/s: {}",
                        group(c.max_adapters_at_target.unwrap_or(0) as u64),
                        short(t.rate),
                        breaking(b)
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "  - adapters: nothing up to the search's ceiling of {}",
                        group(s.max_adapters as u64)
                    );
                }
            }
            if let Some(g) = &r.growth {
                match g.for_twice_the_target.and_then(|i| r.candidate(i)) {
                    Some(next) => {
                        let _ = writeln!(
                            out,
                            "  - twice the target ({} req/s) needs {} at {}/hour",
                            short(2.0 * t.rate),
                            next.label(),
                            usd(next.usd_per_hour)
                        );
                    }
                    None => {
                        let _ = writeln!(
                            out,
                            "  - twice the target ({} req/s): no configuration tried reaches it",
                            short(2.0 * t.rate)
                        );
                    }
                }
            }
        }
        Verdict::OverBudget {
            budget_usd_per_hour,
            cheapest_usd_per_hour,
            cheapest_candidate,
        } => {
            let c = &r.candidates[*cheapest_candidate];
            let _ = writeln!(
                out,
                "Nothing within the budget of {}/hour meets {} req/s. The cheapest that does: {} \
                 at {}/hour ({}, {}× the target).",
                usd(*budget_usd_per_hour),
                short(t.rate),
                c.label(),
                usd(*cheapest_usd_per_hour),
                rate_text(c),
                times(c.headroom.unwrap_or(0.0))
            );
        }
        Verdict::NoneMeetsTarget {
            best_max_rate,
            best_candidate,
        } => {
            let _ = writeln!(
                out,
                "No configuration tried meets {} req/s with {} adapters within the SLO.",
                short(t.rate),
                group(t.adapters as u64)
            );
            match (best_max_rate, best_candidate.and_then(|i| r.candidate(i))) {
                (Some(rate), Some(c)) => {
                    let _ = writeln!(
                        out,
                        "  The most any sustains: {} req/s ({}, {}/hour).",
                        short(*rate),
                        c.label(),
                        usd(c.usd_per_hour)
                    );
                    if let Some(b) = &c.breaks_first {
                        let _ = writeln!(out, "  Beyond that: {}.", breaking(b));
                    }
                }
                _ => {
                    out.push_str("  None meets the SLO at any rate tried.\n");
                    if let Some(c) = r
                        .candidates
                        .iter()
                        .find(|c| c.role == Role::Deployment && c.infeasible.is_some())
                    {
                        let _ = writeln!(
                            out,
                            "  For example {}: {}",
                            c.label(),
                            c.infeasible.as_deref().unwrap_or("")
                        );
                    }
                }
            }
            out.push_str(
                "  Options: more replicas (--max-replicas) or GPUs (--max-gpus), other GPU kinds \
                 (--gpus), fewer adapters (--adapters), a looser SLO, or a lower target rate.\n",
            );
        }
    }

    let infeasible: Vec<&Candidate> = r
        .candidates
        .iter()
        .filter(|c| c.role == Role::Deployment && c.infeasible.is_some() && c.rate_search.is_none())
        .collect();
    if !infeasible.is_empty() {
        let mut reasons: Vec<(String, usize)> = Vec::new();
        for c in &infeasible {
            let why = c.infeasible.clone().unwrap_or_default();
            match reasons.iter_mut().find(|(w, _)| *w == why) {
                Some((_, n)) => *n += 1,
                None => reasons.push((why, 1)),
            }
        }
        let _ = writeln!(
            out,
            "\nNot evaluated: {} deployment{}:",
            infeasible.len(),
            if infeasible.len() == 1 { "" } else { "s" }
        );
        for (why, n) in reasons.iter().take(4) {
            let _ = writeln!(out, "  - {n} × {why}");
        }
    }
    let mut kinds: Vec<String> = Vec::new();
    for c in r.candidates.iter().filter(|c| c.provenance.is_some()) {
        let entry = format!(
            "{} TP {} {}",
            c.config.gpu,
            c.config.tensor_parallel,
            provenance(c.provenance)
        );
        if !kinds.contains(&entry) {
            kinds.push(entry);
        }
    }
    if !kinds.is_empty() {
        let _ = writeln!(out, "\nCosts: {}.", kinds.join(", "));
    }
    for note in &r.notes {
        let _ = writeln!(out, "Note: {note}.");
    }
    out
}
