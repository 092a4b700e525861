//! What a report page holds, independent of its format. `html` and `markdown` each render a
//! `Page`; building it once keeps the two reports identical in content.

use crate::charts::Rendered;
use crate::tables::Table;
use slora_sim::cost::Provenance;
use std::collections::BTreeMap;

pub(crate) struct Page {
    /// "Run report" or "Sweep report".
    pub kind: &'static str,
    pub scenario: String,
    /// One badge each; a sweep whose points disagree shows every label.
    pub provenance: Vec<Option<Provenance>>,
    /// Short `label: value` facts under the heading (cost model, seed, …).
    pub facts: Vec<(String, String)>,
    pub summary: Vec<Table>,
    pub charts: Vec<Rendered>,
    pub details: Vec<Table>,
    pub definitions: BTreeMap<String, String>,
    /// The data files written beside the report, for the "files" list.
    pub data_files: Vec<String>,
}
