//! Printing answers: JSON, or tables for people (nested values indented, lists one per line).

use super::*;

pub(crate) fn print_json_or_table(output: Output, v: &Value) -> anyhow::Result<()> {
    print_value(output, v)
}

/// Print an answer of the API (or any JSON value). As JSON it is written straight from the
/// answer into a buffer wiped afterwards, since answers may hold plaintexts and secret values.
pub(super) fn print_value<T: serde::Serialize + ?Sized>(output: Output, v: &T) -> anyhow::Result<()> {
    match output {
        Output::Json => outln!("{}", zeroize::Zeroizing::new(serde_json::to_string_pretty(v)?).as_str()),
        Output::Table => print_table(&val(v)?, "")?,
    }
    Ok(())
}

/// An answer as the JSON value the server sent, for the printers.
pub(super) fn val<T: serde::Serialize + ?Sized>(v: &T) -> anyhow::Result<Value> {
    Ok(serde_json::to_value(v)?)
}

pub(super) fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.iter().all(|i| !i.is_object() && !i.is_array()) => {
            items.iter().map(scalar).collect::<Vec<_>>().join(", ")
        }
        // A list of lists (a policy's identity sets): each set, then the next.
        Value::Array(items) if items.iter().all(Value::is_array) => {
            items.iter().map(scalar).collect::<Vec<_>>().join(" | ")
        }
        other => other.to_string(),
    }
}

pub(super) fn is_plain(v: &Value) -> bool {
    match v {
        Value::Object(_) => false,
        Value::Array(a) => !a.iter().any(Value::is_object),
        _ => true,
    }
}

/// Print an object as aligned `key: value` lines; arrays of objects as tables. An object that
/// is only a list (`{"policies": [...]}`) prints its items: one per line, or as a table.
pub(super) fn print_table(v: &Value, indent: &str) -> anyhow::Result<()> {
    match v {
        Value::Object(m) if m.len() == 1 && m.values().all(Value::is_array) => {
            let items = m.values().flat_map(|x| x.as_array().into_iter().flatten()).cloned().collect::<Vec<_>>();
            if items.iter().all(is_plain) {
                for item in &items {
                    outln!("{indent}{}", scalar(item));
                }
            } else {
                print_rows(&items, indent)?;
            }
        }
        Value::Object(m) => {
            let width = m.iter().filter(|(_, v)| is_plain(v)).map(|(k, _)| k.len()).max().unwrap_or(0);
            for (k, val) in m {
                match val {
                    Value::Array(items) if items.is_empty() => outln!("{indent}{k:width$}  -"),
                    Value::Array(items) if items.iter().all(|i| i.is_array()) => {
                        outln!("{indent}{k}:");
                        for i in items {
                            outln!("{indent}  {}", scalar(i));
                        }
                    }
                    Value::Array(items) if !is_plain(val) => {
                        outln!("{indent}{k}:");
                        print_rows(items, &format!("{indent}  "))?;
                    }
                    Value::Object(_) => {
                        outln!("{indent}{k}:");
                        print_table(val, &format!("{indent}  "))?;
                    }
                    _ => outln!("{indent}{k:width$}  {}", scalar(val)),
                }
            }
        }
        Value::Array(items) => print_rows(items, indent)?,
        other => outln!("{indent}{}", scalar(other)),
    }
    Ok(())
}

/// Rows of objects under upper-case column names; lists inside a cell are joined.
pub(super) fn print_rows(items: &[Value], indent: &str) -> anyhow::Result<()> {
    let mut cols: Vec<String> = Vec::new();
    for it in items {
        if let Value::Object(m) = it {
            for (k, v) in m {
                if !v.is_object() && !cols.contains(k) {
                    cols.push(k.clone());
                }
            }
        }
    }
    if cols.is_empty() {
        for it in items {
            outln!("{indent}{}", scalar(it));
        }
        return Ok(());
    }
    let rows: Vec<Vec<String>> = items.iter().map(|it| cols.iter().map(|c| scalar(&it[c])).collect()).collect();
    let widths: Vec<usize> =
        cols.iter().enumerate().map(|(i, c)| rows.iter().map(|r| r[i].len()).max().unwrap_or(0).max(c.len())).collect();
    let line = |cells: Vec<String>| -> anyhow::Result<()> {
        let parts: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:w$}", w = widths[i])).collect();
        outln!("{indent}{}", parts.join("  ").trim_end());
        Ok(())
    };
    line(cols.iter().map(|c| c.to_uppercase()).collect())?;
    for r in rows {
        line(r)?;
    }
    Ok(())
}

/// The whole answer as JSON, or in a table only `single` (a signature, a ciphertext).
pub(super) fn single_or_value<T: serde::Serialize>(output: Output, v: &T, single: &str) -> anyhow::Result<ExitCode> {
    match output {
        Output::Json => print_value(output, v)?,
        Output::Table => outln!("{single}"),
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn validity(output: Output, v: &keyward_client::api::Validity) -> anyhow::Result<ExitCode> {
    let valid = v.valid;
    match output {
        Output::Json => print_value(output, v)?,
        Output::Table => outln!("{}", if valid { "valid" } else { "INVALID" }),
    }
    Ok(if valid { ExitCode::SUCCESS } else { ExitCode::from(3) })
}
