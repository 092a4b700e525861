//! The self-contained HTML report: inline CSS, charts as inline SVG, no scripts, no external
//! references, so the file opens offline, can be mailed as one attachment, and prints.

use crate::page::Page;
use crate::tables::{provenance_label, Table};
use std::fmt::Write as _;

/// Escapes text for element content and attribute values.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

const STYLE: &str = r#"
body { font-family: "DejaVu Sans", Verdana, Arial, sans-serif; margin: 0 auto; max-width: 1080px;
       padding: 24px; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 1.05em; margin: 1em 0 0.4em; }
.badge { display: inline-block; padding: 3px 10px; border-radius: 12px; font-size: 0.8em;
         font-weight: bold; color: #fff; vertical-align: middle; margin-left: 6px;
         text-transform: uppercase; letter-spacing: 0.04em; }
.badge.derived { background: #b8860b; }
.badge.calibrated { background: #2f6db5; }
.badge.executed { background: #2e8b3e; }
.badge.unlabelled { background: #777; }
.provenance-note { color: #555; font-size: 0.9em; }
.facts { color: #444; font-size: 0.95em; }
.facts span { margin-right: 1.4em; white-space: nowrap; }
.grid { display: flex; flex-wrap: wrap; gap: 12px 28px; }
.grid > section { flex: 1 1 300px; }
table { border-collapse: collapse; font-size: 0.9em; margin: 4px 0; }
th, td { border-bottom: 1px solid #e3e3e3; padding: 3px 10px; }
th { background: #f4f4f4; text-align: right; }
td { text-align: right; font-variant-numeric: tabular-nums; }
th:first-child, td:first-child { text-align: left; }
.note { color: #555; font-size: 0.85em; }
figure { margin: 1.2em 0 2em; }
figure svg { width: 100%; height: auto; max-width: 1000px; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.9em; max-width: 1000px; }
dl { font-size: 0.9em; }
dt { font-weight: bold; margin-top: 0.5em; }
dd { margin-left: 1.5em; }
.wide { overflow-x: auto; }
"#;

fn table_html(out: &mut String, table: &Table) {
    let _ = writeln!(out, "<h3>{}</h3>", escape(&table.title));
    out.push_str("<div class=\"wide\"><table>\n<thead><tr>");
    for h in &table.header {
        let _ = write!(out, "<th>{}</th>", escape(h));
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    for row in &table.rows {
        out.push_str("<tr>");
        for cell in row {
            let _ = write!(out, "<td>{}</td>", escape(cell));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody></table></div>\n");
    if let Some(note) = &table.note {
        let _ = writeln!(out, "<p class=\"note\">{}</p>", escape(note));
    }
}

/// Strips the XML prologue, if any, so the SVG can sit inside HTML.
fn inline_svg(svg: &str) -> &str {
    match svg.find("<svg") {
        Some(start) => &svg[start..],
        None => svg,
    }
}

pub(crate) fn render(page: &Page) -> String {
    let mut out = String::new();
    let title = format!("{}: {}", page.kind, page.scenario);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        escape(&title)
    );
    let _ = write!(out, "<h1>{} ", escape(&title));
    for p in &page.provenance {
        let (label, _) = provenance_label(*p);
        let _ = write!(
            out,
            "<span class=\"badge {label}\" title=\"provenance\">{label}</span>"
        );
    }
    out.push_str("</h1>\n");
    for p in &page.provenance {
        let (label, meaning) = provenance_label(*p);
        let _ = writeln!(
            out,
            "<p class=\"provenance-note\">Provenance <b>{label}</b>: {}.</p>",
            escape(meaning)
        );
    }
    out.push_str("<p class=\"facts\">");
    for (k, v) in &page.facts {
        let _ = write!(out, "<span><b>{}:</b> {}</span> ", escape(k), escape(v));
    }
    out.push_str("</p>\n");

    out.push_str("<h2>Summary</h2>\n<div class=\"grid\">\n");
    for table in &page.summary {
        out.push_str("<section>\n");
        table_html(&mut out, table);
        out.push_str("</section>\n");
    }
    out.push_str("</div>\n");

    out.push_str("<h2>Charts</h2>\n");
    for chart in &page.charts {
        let _ = write!(
            out,
            "<figure id=\"{}\">\n<h3>{}</h3>\n{}\n<figcaption>{} \
             <span class=\"note\">({}.png, {}.svg)</span></figcaption>\n</figure>\n",
            chart.name,
            escape(&chart.heading),
            inline_svg(&chart.svg_text),
            escape(&chart.caption),
            chart.name,
            chart.name
        );
    }

    if !page.details.is_empty() {
        out.push_str("<h2>Details</h2>\n");
        for table in &page.details {
            table_html(&mut out, table);
        }
    }

    if !page.definitions.is_empty() {
        out.push_str("<h2>Definitions</h2>\n<dl>\n");
        for (k, v) in &page.definitions {
            let _ = writeln!(out, "<dt>{}</dt><dd>{}</dd>", escape(k), escape(v));
        }
        out.push_str("</dl>\n");
    }

    if !page.data_files.is_empty() {
        out.push_str("<h2>Data files</h2>\n<p class=\"note\">Beside this report: ");
        let names: Vec<String> = page
            .data_files
            .iter()
            .map(|f| format!("<code>{}</code>", escape(f)))
            .collect();
        out.push_str(&names.join(", "));
        out.push_str(".</p>\n");
    }
    out.push_str("</body>\n</html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(escape("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
    }

    #[test]
    fn strips_xml_prologue() {
        assert_eq!(inline_svg("<?xml version=\"1.0\"?>\n<svg a>"), "<svg a>");
    }
}
