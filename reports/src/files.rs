//! Plain data files: JSON and CSV.
//!
//! Every file is a pure function of its input: no timestamps, no hash-map iteration (the
//! input types use `BTreeMap`), times printed from integer nanoseconds, so identical inputs
//! give byte-identical files. CSVs stream through a `BufWriter`: a million rows cost one
//! pass and no intermediate strings per file.

use crate::error::ReportError;
use serde::Serialize;
use slora_engine::Nanos;
use slora_sim::metrics::{RequestRecord, RequestStatus, StepRecord, SweepResult};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// Creates `dir` and its parents; an existing directory is fine, an existing file is not.
pub(crate) fn create_dir(dir: &Path) -> Result<(), ReportError> {
    std::fs::create_dir_all(dir).map_err(|source| ReportError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })
}

pub(crate) fn write_bytes(path: &Path, bytes: &[u8]) -> Result<PathBuf, ReportError> {
    std::fs::write(path, bytes).map_err(|source| ReportError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(path.to_path_buf())
}

/// Pretty JSON with a trailing newline.
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<PathBuf, ReportError> {
    let file = File::create(path).map_err(|source| ReportError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = BufWriter::new(file);
    serde_json::to_writer_pretty(&mut out, value).map_err(|source| ReportError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    out.write_all(b"\n")
        .and_then(|()| out.flush())
        .map_err(|source| ReportError::Write {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(path.to_path_buf())
}

/// Opens `path`, lets `body` stream rows into it, and flushes; any I/O error names `path`.
fn write_streamed(
    path: &Path,
    body: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
) -> Result<PathBuf, ReportError> {
    let result = File::create(path).and_then(|file| {
        // 1 MiB: large enough that a million-row CSV is a few hundred write calls.
        let mut out = BufWriter::with_capacity(1 << 20, file);
        body(&mut out)?;
        out.flush()
    });
    result.map_err(|source| ReportError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(path.to_path_buf())
}

pub(crate) const REQUEST_COLUMNS: &str = "id,adapter,tenant,prompt_tokens,output_tokens,\
arrival_s,admitted_s,first_token_s,finish_s,ttft_s,tpot_s,e2e_s,queueing_s,status,preemptions";

pub(crate) const STEP_COLUMNS: &str = "start_s,duration_s,prefill_requests,prefill_tokens,\
decode_requests,distinct_adapters,kv_pages,adapter_pages,free_pages,waiting,loads,evictions,\
aborted,preempted,model_s";

/// One row per request; `None` is an empty cell. Derived latencies use `RequestRecord`'s own
/// methods so the CSV and the simulator's summaries share one definition.
pub(crate) fn write_requests_csv(
    path: &Path,
    requests: &[RequestRecord],
) -> Result<PathBuf, ReportError> {
    write_streamed(path, |out| {
        writeln!(out, "{REQUEST_COLUMNS}")?;
        for r in requests {
            write!(out, "{},", r.id)?;
            opt_u32(out, r.adapter)?;
            opt_u32(out, r.tenant)?;
            write!(out, "{},{},", r.prompt_tokens, r.output_tokens)?;
            secs(out, r.arrival)?;
            out.write_all(b",")?;
            opt_secs(out, r.admitted)?;
            opt_secs(out, r.first_token)?;
            opt_secs(out, r.finish)?;
            opt_secs(out, r.ttft())?;
            match r.tpot() {
                Some(t) => write!(out, "{t:.9},")?,
                None => out.write_all(b",")?,
            }
            opt_secs(out, r.e2e())?;
            opt_secs(out, r.queueing())?;
            writeln!(out, "{},{}", status_name(r.status), r.preemptions)?;
        }
        Ok(())
    })
}

/// One row per step, every `StepRecord` field, times in seconds.
pub(crate) fn write_steps_csv(path: &Path, steps: &[StepRecord]) -> Result<PathBuf, ReportError> {
    write_streamed(path, |out| {
        writeln!(out, "{STEP_COLUMNS}")?;
        for s in steps {
            secs(out, s.start)?;
            out.write_all(b",")?;
            secs(out, s.duration)?;
            write!(
                out,
                ",{},{},{},{},{},{},{},{},{},{},{},{}",
                s.prefill_requests,
                s.prefill_tokens,
                s.decode_requests,
                s.distinct_adapters,
                s.kv_pages,
                s.adapter_pages,
                s.free_pages,
                s.waiting,
                s.loads,
                s.evictions,
                s.aborted,
                s.preempted
            )?;
            out.write_all(b",")?;
            secs(out, s.model)?;
            out.write_all(b"\n")?;
        }
        Ok(())
    })
}

/// One row per sweep point, in the sweep's order. Swept parameters come first, one column per
/// dotted path (the union over all points, sorted), so the file loads straight into a
/// dataframe.
pub(crate) fn write_sweep_csv(path: &Path, sweep: &SweepResult) -> Result<PathBuf, ReportError> {
    let keys = parameter_keys(sweep);
    write_streamed(path, |out| {
        let mut header = String::new();
        for key in &keys {
            header.push_str(&csv_cell(key));
            header.push(',');
        }
        header.push_str(
            "adapters,offered_rate_req_s,throughput_req_s,output_tok_s,goodput_req_s,\
ttft_p50_s,ttft_p99_s,tpot_p50_s,tpot_p99_s,slo_attainment,meets_slo,submitted,completed,\
aborted,rejected",
        );
        writeln!(out, "{header}")?;
        for p in &sweep.points {
            let mut row = String::new();
            for key in &keys {
                if let Some(v) = p.parameters.get(key.as_str()) {
                    row.push_str(&csv_cell(&parameter_text(v)));
                }
                row.push(',');
            }
            let m = &p.metrics;
            // Writing into a String cannot fail.
            let _ = write!(
                row,
                "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                p.adapters,
                p.offered_rate,
                m.throughput.requests_per_s,
                m.throughput.output_tokens_per_s,
                m.throughput.goodput_requests_per_s,
                m.ttft_s.p50,
                m.ttft_s.p99,
                m.tpot_s.p50,
                m.tpot_s.p99,
                m.slo_attainment,
                m.meets_slo,
                m.requests.submitted,
                m.requests.completed,
                m.requests.aborted,
                m.requests.rejected
            );
            writeln!(out, "{row}")?;
        }
        Ok(())
    })
}

/// Every parameter path used by any point, sorted.
pub(crate) fn parameter_keys(sweep: &SweepResult) -> Vec<String> {
    let mut keys: Vec<String> = sweep
        .points
        .iter()
        .flat_map(|p| p.parameters.keys().cloned())
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// A parameter value as a reader expects it: strings without JSON quotes.
pub(crate) fn parameter_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// RFC 4180 quoting, only when needed.
fn csv_cell(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

pub(crate) fn status_name(status: RequestStatus) -> &'static str {
    match status {
        RequestStatus::Completed => "completed",
        RequestStatus::Aborted => "aborted",
        RequestStatus::Rejected => "rejected",
    }
}

/// Exact decimal seconds from integer nanoseconds: no float rounding, always 9 decimals.
fn secs(out: &mut impl Write, t: Nanos) -> io::Result<()> {
    write!(out, "{}.{:09}", t.0 / 1_000_000_000, t.0 % 1_000_000_000)
}

/// An optional time followed by the separator.
fn opt_secs(out: &mut impl Write, t: Option<Nanos>) -> io::Result<()> {
    if let Some(t) = t {
        secs(out, t)?;
    }
    out.write_all(b",")
}

fn opt_u32(out: &mut impl Write, v: Option<u32>) -> io::Result<()> {
    match v {
        Some(v) => write!(out, "{v},"),
        None => out.write_all(b","),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_exact_decimals() {
        let mut buf = Vec::new();
        secs(&mut buf, Nanos(12_000_000_345)).unwrap();
        assert_eq!(String::from_utf8(buf).unwrap(), "12.000000345");
    }

    #[test]
    fn cells_are_quoted_only_when_needed() {
        assert_eq!(csv_cell("a.b"), "a.b");
        assert_eq!(csv_cell("x,y"), "\"x,y\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
    }

    #[test]
    fn parameter_strings_lose_their_quotes() {
        assert_eq!(parameter_text(&serde_json::json!("h100")), "h100");
        assert_eq!(parameter_text(&serde_json::json!(2.5)), "2.5");
    }
}
