//! The formats of an export: NDJSON (the stored events, lossless), CSV (a fixed set of
//! columns for spreadsheets) and FHIR (a `searchset` Bundle of AuditEvents). Each is written
//! event by event, so an export of any size streams in bounded memory.

use crate::ApiError;
use crate::auth::EventView;
use axum::http::{HeaderMap, header};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Ndjson,
    Csv,
    Fhir,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "ndjson" => Some(Format::Ndjson),
            "csv" => Some(Format::Csv),
            "fhir" => Some(Format::Fhir),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Ndjson => "ndjson",
            Format::Csv => "csv",
            Format::Fhir => "fhir",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Ndjson => "application/x-ndjson",
            Format::Csv => "text/csv; charset=utf-8; header=present",
            Format::Fhir => "application/fhir+json",
        }
    }

    /// The file name extension of an export object.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Ndjson => "ndjson",
            Format::Csv => "csv",
            Format::Fhir => "json",
        }
    }

    /// The format an `Accept` header asks for: the first media type listed that names one
    /// (quality values are not weighed); `None` when none does.
    fn from_accept(headers: &HeaderMap) -> Option<Format> {
        let accept = headers.get(header::ACCEPT)?.to_str().ok()?;
        accept.split(',').find_map(|media| {
            let media = media.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
            match media.as_str() {
                "application/x-ndjson" | "application/ndjson" => Some(Format::Ndjson),
                "text/csv" => Some(Format::Csv),
                "application/fhir+json" => Some(Format::Fhir),
                _ => None,
            }
        })
    }
}

/// The format an export asks for: `format=` (removed from `params`, which are the search's),
/// else the `Accept` header, else NDJSON.
pub fn negotiate(
    params: &mut Vec<(String, String)>,
    headers: &HeaderMap,
) -> Result<Format, ApiError> {
    let given: Vec<String> =
        params.iter().filter(|(k, _)| k == "format").map(|(_, v)| v.clone()).collect();
    params.retain(|(k, _)| k != "format");
    match given.as_slice() {
        [] => Ok(Format::from_accept(headers).unwrap_or(Format::Ndjson)),
        [one] => Format::parse(one).ok_or_else(|| {
            ApiError::bad_request("invalid_parameter", "format: must be ndjson, csv or fhir")
        }),
        _ => Err(ApiError::bad_request("invalid_parameter", "format: may be given once")),
    }
}

/// The CSV columns, in order, with where each cell comes from in the event (a JSON pointer).
/// A string is written as it is; a number or boolean as JSON; an array of strings (`roles`,
/// `purpose_of_use`) joined with `;`; any other array or object as canonical JSON; a missing
/// field as an empty cell. docs/api.md lists the same columns.
pub const CSV_COLUMNS: &[(&str, &str)] = &[
    ("seq", "/seq"),
    ("id", "/id"),
    ("occurred_at", "/occurred_at"),
    ("recorded_at", "/recorded_at"),
    ("category", "/category"),
    ("action", "/action"),
    ("outcome", "/outcome"),
    ("outcome_code", "/outcome_code"),
    ("outcome_desc", "/outcome_desc"),
    ("actor_user_id", "/actor/user_id"),
    ("actor_name", "/actor/name"),
    ("actor_roles", "/actor/roles"),
    ("actor_client_id", "/actor/client_id"),
    ("actor_session_id", "/actor/session_id"),
    ("actor_ip", "/actor/ip"),
    ("actor_user_agent", "/actor/user_agent"),
    ("actor_device_id", "/actor/device_id"),
    ("source_system", "/source/system"),
    ("source_site", "/source/site"),
    ("source_type", "/source/type"),
    ("patient_id", "/patient/id"),
    ("patient_system", "/patient/system"),
    ("project", "/project"),
    ("purpose_of_use", "/purpose_of_use"),
    ("request_method", "/request/method"),
    ("request_path", "/request/path"),
    ("request_query", "/request/query"),
    ("request_status", "/request/status"),
    ("entities", "/entities"),
    ("changes", "/changes"),
    ("context", "/context"),
];

/// Characters that make a spreadsheet read a cell as a formula (OWASP's list): such a cell
/// gets a leading apostrophe, which spreadsheets show as text and do not evaluate.
const FORMULA_STARTS: &[char] = &['=', '+', '-', '@', '\t', '\r'];

fn cell_text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => {
            items.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(";")
        }
        Some(v @ (Value::Array(_) | Value::Object(_))) => {
            String::from_utf8(auditrail_core::event::canonical_bytes(v)).expect("JSON is UTF-8")
        }
        Some(v) => v.to_string(),
    }
}

/// One RFC 4180 field, neutralised against formula injection.
fn write_cell(text: &str, out: &mut Vec<u8>) {
    let guarded;
    let text = if text.starts_with(FORMULA_STARTS) {
        guarded = format!("'{text}");
        guarded.as_str()
    } else {
        text
    };
    if text.contains([',', '"', '\r', '\n']) {
        out.push(b'"');
        out.extend_from_slice(text.replace('"', "\"\"").as_bytes());
        out.push(b'"');
    } else {
        out.extend_from_slice(text.as_bytes());
    }
}

fn write_row<'a>(cells: impl Iterator<Item = &'a str>, out: &mut Vec<u8>) {
    for (i, cell) in cells.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_cell(cell, out);
    }
    out.extend_from_slice(b"\r\n");
}

/// One CSV row of these cells (RFC 4180, formula injection neutralised).
pub(crate) fn write_csv_cells<'a>(cells: impl Iterator<Item = &'a str>, out: &mut Vec<u8>) {
    write_row(cells, out);
}

/// A CSV header row: the `leading` columns (a report's own), then the export's [`CSV_COLUMNS`].
pub(crate) fn write_csv_header(leading: &[&str], out: &mut Vec<u8>) {
    write_row(leading.iter().copied().chain(CSV_COLUMNS.iter().map(|c| c.0)), out);
}

/// A CSV row: the `leading` cells, then the export's columns of `event` (as the caller may see
/// it: masked already). Every cell is neutralised against formula injection.
pub(crate) fn write_csv_row(leading: &[&str], event: &Value, out: &mut Vec<u8>) {
    let cells: Vec<String> =
        CSV_COLUMNS.iter().map(|(_, at)| cell_text(event.pointer(at))).collect();
    write_row(leading.iter().copied().chain(cells.iter().map(String::as_str)), out);
}

/// Writes an export in one format, event by event.
pub struct Encoder {
    format: Format,
    /// The FHIR base URL for `fullUrl`s (none: entries without one).
    fhir_base: Option<String>,
    events: u64,
}

impl Encoder {
    pub fn new(format: Format, fhir_base: Option<String>) -> Encoder {
        Encoder { format, fhir_base, events: 0 }
    }

    /// What comes before the first event: the CSV header row, the Bundle's opening.
    pub fn begin(&mut self, total: u64, timestamp: &str, out: &mut Vec<u8>) {
        match self.format {
            Format::Ndjson => {}
            Format::Csv => write_csv_header(&[], out),
            Format::Fhir => out.extend_from_slice(
                format!(
                    r#"{{"resourceType":"Bundle","type":"searchset","timestamp":"{timestamp}","total":{total}"#
                )
                .as_bytes(),
            ),
        }
    }

    /// One stored event, as `view` shows it; false when the view hides it.
    pub fn event(
        &mut self,
        stored: &[u8],
        view: &EventView,
        out: &mut Vec<u8>,
    ) -> Result<bool, ApiError> {
        if self.format == Format::Ndjson {
            view.write_json(stored, out)?;
            out.push(b'\n');
            self.events += 1;
            return Ok(true);
        }
        let mut event: Value = serde_json::from_slice(stored).map_err(ApiError::internal)?;
        if !view.apply(&mut event) {
            return Ok(false);
        }
        match self.format {
            Format::Ndjson => unreachable!("written above"),
            Format::Csv => write_csv_row(&[], &event, out),
            Format::Fhir => {
                // FHIR JSON has no empty arrays: `entry` opens with the first event.
                out.extend_from_slice(if self.events == 0 { b",\"entry\":[" } else { b"," });
                let resource = auditrail_core::fhir::to_audit_event(&event);
                let full_url = self.fhir_base.as_ref().map(|base| {
                    let id = resource.get("id").and_then(Value::as_str).unwrap_or("");
                    format!("{base}/AuditEvent/{id}")
                });
                let mut entry =
                    serde_json::json!({"resource": resource, "search": {"mode": "match"}});
                if let Some(url) = full_url {
                    entry["fullUrl"] = url.into();
                }
                serde_json::to_writer(&mut *out, &entry).map_err(ApiError::internal)?;
            }
        }
        self.events += 1;
        Ok(true)
    }

    /// What comes after the last event.
    pub fn end(&mut self, out: &mut Vec<u8>) {
        if self.format == Format::Fhir {
            out.extend_from_slice(if self.events == 0 { b"}" } else { b"]}" });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(cells: &[&str]) -> String {
        let mut out = Vec::new();
        write_row(cells.iter().copied(), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn cells_are_quoted_as_rfc_4180_says_and_formulas_are_defused() {
        assert_eq!(row(&["a", "b c", ""]), "a,b c,\r\n");
        assert_eq!(
            row(&["x,y", "say \"hi\"", "two\nlines"]),
            "\"x,y\",\"say \"\"hi\"\"\",\"two\nlines\"\r\n"
        );
        assert_eq!(
            row(&["=1+2", "+1", "-1", "@SUM(A1)", "\tx"]),
            "'=1+2,'+1,'-1,'@SUM(A1),'\tx\r\n"
        );
        assert_eq!(row(&["=HYPERLINK(\"x\",\"y\")"]), "\"'=HYPERLINK(\"\"x\"\",\"\"y\"\")\"\r\n");
    }

    #[test]
    fn cells_flatten_the_event() {
        let e = serde_json::json!({"seq": 7, "actor": {"roles": ["a", "b"]},
            "context": {"z": "1", "a": "2"}, "entities": [{"type": "patient"}]});
        assert_eq!(cell_text(e.pointer("/seq")), "7");
        assert_eq!(cell_text(e.pointer("/actor/roles")), "a;b");
        assert_eq!(cell_text(e.pointer("/context")), r#"{"a":"2","z":"1"}"#);
        assert_eq!(cell_text(e.pointer("/entities")), r#"[{"type":"patient"}]"#);
        assert_eq!(cell_text(e.pointer("/patient/id")), "");
    }

    #[test]
    fn accept_chooses_only_when_format_is_absent() {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, "text/html, text/csv;q=0.9".parse().unwrap());
        let mut params = vec![("project".to_string(), "p".to_string())];
        assert_eq!(negotiate(&mut params, &headers).unwrap(), Format::Csv);
        params.push(("format".into(), "fhir".into()));
        assert_eq!(negotiate(&mut params, &headers).unwrap(), Format::Fhir);
        assert_eq!(params, [("project".to_string(), "p".to_string())], "format is not a filter");
        params.push(("format".into(), "xml".into()));
        assert!(negotiate(&mut params, &headers).is_err());
        assert_eq!(negotiate(&mut Vec::new(), &HeaderMap::new()).unwrap(), Format::Ndjson);
    }
}
