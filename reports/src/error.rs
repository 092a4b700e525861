//! The one error type of this crate. Every variant names the file or directory involved, and
//! chart failures also name the chart, so a failed report says exactly what to look at.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The output directory could not be created (or is a file).
    #[error("cannot create report directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file could not be created, written or flushed.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON file could not be serialised or written.
    #[error("cannot write JSON to {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// Drawing or encoding a chart failed.
    #[error("cannot draw chart `{chart}` into {path}: {source}")]
    Chart {
        chart: &'static str,
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An input (a run folder, `metrics.json`, `requests.csv`) could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An input was read but is not what it should be: not a run folder, malformed JSON, a
    /// bad CSV line. `reason` says what is wrong and where (line, column).
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    /// The font embedded in this crate was rejected by the glyph rasteriser. Only a corrupted
    /// build can cause it; it is an error rather than a panic so a report run never aborts.
    #[error("the embedded chart font (assets/DejaVuSans.ttf) could not be loaded")]
    Font,
}
