//! The Markdown report: the same content as the HTML one, with charts linked as the PNG files
//! beside it (Markdown viewers show PNG everywhere; inline SVG is often stripped).

use crate::page::Page;
use crate::tables::{provenance_label, Table};
use std::fmt::Write as _;

/// Escapes angle brackets, which Markdown renderers would take for HTML tags (a scenario
/// called `<llama-7b>` would vanish).
fn text(s: &str) -> String {
    s.replace('<', "&lt;").replace('>', "&gt;")
}

/// Escapes what would break a table cell or start markup.
fn cell(s: &str) -> String {
    text(s)
        .replace('\\', "\\\\")
        .replace('|', "\\|")
        .replace('\n', " ")
}

fn table_md(out: &mut String, table: &Table) {
    let _ = writeln!(out, "### {}\n", text(&table.title));
    table_body(out, table);
    if let Some(note) = &table.note {
        let _ = writeln!(out, "{}\n", text(note));
    }
}

/// A table's header, rule and rows (no title or note), then a blank line.
pub(crate) fn table_body(out: &mut String, table: &Table) {
    let header: Vec<String> = table.header.iter().map(|h| cell(h)).collect();
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let rule: Vec<&str> = (0..table.header.len())
        .map(|i| if i == 0 { "---" } else { "---:" })
        .collect();
    let _ = writeln!(out, "| {} |", rule.join(" | "));
    for row in &table.rows {
        let cells: Vec<String> = row.iter().map(|c| cell(c)).collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out.push('\n');
}

pub(crate) fn render(page: &Page) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# {}: {}\n", page.kind, text(&page.scenario));
    for p in &page.provenance {
        let (label, meaning) = provenance_label(*p);
        let _ = writeln!(
            out,
            "**Provenance: `{}`** — {meaning}.\n",
            label.to_uppercase()
        );
    }
    for (k, v) in &page.facts {
        let _ = writeln!(out, "- **{}:** {}", text(k), text(v));
    }
    out.push_str("\n## Summary\n\n");
    for table in &page.summary {
        table_md(&mut out, table);
    }
    out.push_str("## Charts\n\n");
    for chart in &page.charts {
        let _ = writeln!(
            out,
            "### {}\n\n![{}]({}.png)\n\n{} (vector: [{}.svg]({}.svg))\n",
            text(&chart.heading),
            text(&chart.heading),
            chart.name,
            text(&chart.caption),
            chart.name,
            chart.name
        );
    }
    if !page.details.is_empty() {
        out.push_str("## Details\n\n");
        for table in &page.details {
            table_md(&mut out, table);
        }
    }
    if !page.definitions.is_empty() {
        out.push_str("## Definitions\n\n");
        for (k, v) in &page.definitions {
            let _ = writeln!(out, "- **{}**: {}", text(k), text(v));
        }
        out.push('\n');
    }
    if !page.data_files.is_empty() {
        let names: Vec<String> = page.data_files.iter().map(|f| format!("`{f}`")).collect();
        let _ = writeln!(out, "## Data files\n\n{}\n", names.join(", "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipes_do_not_split_cells() {
        assert_eq!(cell("a|b"), "a\\|b");
        assert_eq!(cell("<x>"), "&lt;x&gt;");
    }
}
