//! The component tree as nodes list it (`control/TREE`, a JSON array of [`ComponentRow`]) and as
//! `nodus tree` draws it ([`draw`]). Pure.
//!
//! Ids are decimal strings in JSON, so a JSON reader that keeps numbers as doubles (jq,
//! JavaScript) never rounds a 64-bit id. Each node lists its own components; a component whose
//! parent runs on another node names that node in `parent_node`, so the lists of several nodes
//! join into one forest by `pid`.

use crate::id::ComponentId;
use crate::tree::{Component, ComponentKind};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;

/// Most rows a `TREE` answer carries (the tree's own bound, [`crate::tree::DEFAULT_MAX_COMPONENTS`]).
pub const MAX_ROWS: usize = crate::tree::DEFAULT_MAX_COMPONENTS;

/// One component as listed by `TREE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentRow {
    /// Its id (decimal).
    pub id: String,
    /// What started it (decimal), if anything.
    #[serde(default)]
    pub pid: Option<String>,
    /// `node`, `service`, `app`, `worker`, `task` or `other`.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// The node it runs on.
    pub node: String,
    /// The node its parent runs on, when that is another node.
    #[serde(default)]
    pub parent_node: Option<String>,
    /// Who created it.
    #[serde(default)]
    pub creator: String,
    /// When it was created (Unix ms, 0 = unknown).
    #[serde(default)]
    pub created_at: i64,
    /// When it expires (Unix ms, 0 = never).
    #[serde(default)]
    pub expires_at: i64,
    /// True while it does work.
    pub is_running: bool,
}

impl From<&Component> for ComponentRow {
    fn from(c: &Component) -> Self {
        ComponentRow {
            id: c.id.to_string(),
            pid: c.pid.map(|p| p.to_string()),
            kind: c.kind.to_string(),
            name: c.name.clone(),
            node: c.node.clone(),
            parent_node: c.parent_node.clone(),
            creator: c.creator.clone(),
            created_at: c.created_at,
            expires_at: c.expires_at,
            is_running: c.is_running,
        }
    }
}

impl ComponentRow {
    /// The component it describes.
    ///
    /// Fails with a text naming the bad field (id, pid or kind).
    pub fn to_component(&self) -> Result<Component, String> {
        let id: ComponentId = self.id.parse().map_err(|e| format!("id: {e}"))?;
        let pid = match &self.pid {
            Some(p) => Some(p.parse::<ComponentId>().map_err(|e| format!("pid: {e}"))?),
            None => None,
        };
        let kind: ComponentKind = self.kind.parse()?;
        Ok(Component {
            id,
            pid,
            kind,
            name: self.name.clone(),
            node: self.node.clone(),
            parent_node: self.parent_node.clone(),
            creator: self.creator.clone(),
            created_at: self.created_at,
            expires_at: self.expires_at,
            is_running: self.is_running,
        })
    }
}

/// Rows as `TREE`'s payload.
pub fn encode(rows: &[ComponentRow]) -> Vec<u8> {
    serde_json::to_vec(rows).unwrap_or_else(|_| b"[]".to_vec())
}

/// `TREE`'s payload back into rows.
///
/// Fails when it is not a JSON array of rows, or has more than [`MAX_ROWS`].
pub fn decode(payload: &[u8]) -> Result<Vec<ComponentRow>, String> {
    let rows: Vec<ComponentRow> =
        serde_json::from_slice(payload).map_err(|e| format!("not a list of components: {e}"))?;
    if rows.len() > MAX_ROWS {
        return Err(format!("{} components, more than the {MAX_ROWS} a node lists", rows.len()));
    }
    Ok(rows)
}

/// `rows` (from one node or several) as a forest, depth first, each row with its depth: the
/// roots are the rows whose parent is not listed, in id order; children follow their parent in
/// id order. With `root`, only that component and what it started. A row listed twice (two nodes
/// answering about the same id) appears once.
pub fn forest(rows: &[ComponentRow], root: Option<&str>) -> Vec<(usize, ComponentRow)> {
    let mut by_id: BTreeMap<&str, &ComponentRow> = BTreeMap::new();
    for r in rows {
        by_id.entry(r.id.as_str()).or_insert(r);
    }
    let mut children: BTreeMap<&str, Vec<&ComponentRow>> = BTreeMap::new();
    for r in by_id.values() {
        if let Some(p) = r.pid.as_deref().filter(|p| by_id.contains_key(p) && *p != r.id) {
            children.entry(p).or_default().push(r);
        }
    }
    for list in children.values_mut() {
        list.sort_by_key(|r| sort_key(&r.id));
    }
    let mut roots: Vec<&ComponentRow> = match root {
        Some(id) => by_id.get(id).copied().into_iter().collect(),
        None => by_id
            .values()
            .copied()
            .filter(|r| r.pid.as_deref().is_none_or(|p| !by_id.contains_key(p) || p == r.id))
            .collect(),
    };
    roots.sort_by_key(|r| sort_key(&r.id));
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut stack: Vec<(usize, &ComponentRow)> = roots.into_iter().rev().map(|r| (0, r)).collect();
    while let Some((depth, r)) = stack.pop() {
        if !seen.insert(r.id.as_str()) {
            continue; // a cycle between nodes' answers: each row once
        }
        out.push((depth, r.clone()));
        if let Some(kids) = children.get(r.id.as_str()) {
            stack.extend(kids.iter().rev().map(|k| (depth + 1, *k)));
        }
    }
    out
}

/// Numeric order of decimal ids (shorter first, then lexical).
fn sort_key(id: &str) -> (usize, &str) {
    (id.len(), id)
}

/// `nodus tree` for people: one line per component, indented under what started it, with its
/// kind, name, node, id and state; a component whose parent is on another node says so.
pub fn draw(rows: &[ComponentRow], root: Option<&str>) -> String {
    let mut out = String::new();
    let listed = forest(rows, root);
    // lasts[k]: the row drawn last at depth k is the last child of its parent.
    let mut lasts: Vec<bool> = Vec::new();
    for (i, (depth, r)) in listed.iter().enumerate() {
        let depth = *depth;
        let last = listed[i + 1..].iter().take_while(|(d, _)| *d >= depth).all(|(d, _)| *d > depth);
        lasts.truncate(depth);
        lasts.push(last);
        let mut prefix = String::new();
        if depth > 0 {
            for ancestor_last in &lasts[1..depth] {
                prefix.push_str(if *ancestor_last { "   " } else { "│  " });
            }
            prefix.push_str(if last { "└─ " } else { "├─ " });
        }
        let state = if r.is_running { "running" } else { "idle" };
        let _ = write!(out, "{prefix}{} {} @{} [{}] {state}", r.kind, r.name, r.node, r.id);
        if let (Some(p), Some(n)) = (&r.pid, &r.parent_node) {
            if depth == 0 {
                let _ = write!(out, " (started by {p} on {n})");
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: u64, pid: Option<u64>, node: &str) -> ComponentRow {
        let c = Component::new(ComponentId::new(id).unwrap(), ComponentKind::Service, format!("s{id}"), node);
        let mut r = ComponentRow::from(&c);
        r.pid = pid.map(|p| p.to_string());
        r
    }

    #[test]
    fn rows_round_trip_through_json_with_string_ids() {
        let mut r = row(u64::MAX, Some(7), "a");
        r.parent_node = Some("b".into());
        let json = String::from_utf8(encode(std::slice::from_ref(&r))).unwrap();
        assert!(json.contains("\"id\":\"18446744073709551615\""), "{json}");
        assert_eq!(decode(json.as_bytes()).unwrap(), vec![r.clone()]);
        let c = r.to_component().unwrap();
        assert_eq!((c.id.get(), c.pid.map(ComponentId::get)), (u64::MAX, Some(7)));
        assert!(decode(b"{}").is_err());
        let mut bad = r;
        bad.kind = "daemon".into();
        assert!(bad.to_component().unwrap_err().contains("daemon"));
    }

    #[test]
    fn rows_of_two_nodes_join_into_one_forest() {
        // a: 1 -> 2 -> 3; b: 4 (started by 3 on a) -> 5; 9 is an orphan on b.
        let mut rows = vec![row(1, None, "a"), row(2, Some(1), "a"), row(3, Some(2), "a")];
        let mut r4 = row(4, Some(3), "b");
        r4.parent_node = Some("a".into());
        rows.extend([r4, row(5, Some(4), "b"), row(9, Some(100), "b")]);
        let f: Vec<(usize, String)> = forest(&rows, None).into_iter().map(|(d, r)| (d, r.id)).collect();
        let want: Vec<(usize, String)> =
            [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (0, 9)].iter().map(|(d, i)| (*d, i.to_string())).collect();
        assert_eq!(f, want);
        let sub: Vec<String> = forest(&rows, Some("3")).into_iter().map(|(_, r)| r.id).collect();
        assert_eq!(sub, ["3", "4", "5"]);
        let text = draw(&rows, None);
        assert!(text.starts_with("service s1 @a [1] running\n└─ service s2 @a [2] running\n"), "{text}");
        assert!(text.contains("         └─ service s5 @b [5] running"), "{text}");
        // Listed twice (by two nodes): once.
        rows.push(row(2, Some(1), "a"));
        assert_eq!(forest(&rows, None).len(), 6);
    }

    #[test]
    fn siblings_are_drawn_with_branches() {
        let rows = vec![row(1, None, "a"), row(2, Some(1), "a"), row(3, Some(1), "a"), row(4, Some(2), "a")];
        let text = draw(&rows, None);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "├─ service s2 @a [2] running");
        assert_eq!(lines[2], "│  └─ service s4 @a [4] running");
        assert_eq!(lines[3], "└─ service s3 @a [3] running");
    }
}
