//! The procedures this node runs: `APP.EVENT` names declared in the apps' manifests, with their
//! parameters. Pure: the catalog resolves a name (arpcp 203 when unknown) and checks arguments
//! against the declaration (arpcp 204) before anything runs.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use nodus_engine::manifest::Param;
use serde_json::Value;

/// One procedure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Procedure {
    /// `APP.EVENT`.
    pub name: String,
    /// The app that runs it.
    pub app: String,
    /// The app event called.
    pub event: String,
    /// Its parameters, in order.
    pub params: Vec<Param>,
}

impl Procedure {
    /// The signature for people: `procs.add(a: number, b: number)`.
    pub fn signature(&self) -> String {
        let params: Vec<String> = self
            .params
            .iter()
            .map(|p| match p.ty {
                Some(t) => format!("{}: {}", p.name, t.name()),
                None => p.name.clone(),
            })
            .collect();
        format!("{}({})", self.name, params.join(", "))
    }

    /// Checks positional arguments against the declaration: their count, and each declared
    /// type.
    ///
    /// # Errors
    /// A message saying which argument does not fit (arpcp 204).
    pub fn check(&self, args: &[Value]) -> Result<(), String> {
        if args.len() != self.params.len() {
            return Err(format!(
                "{} takes {} argument{}, got {}",
                self.signature(),
                self.params.len(),
                if self.params.len() == 1 { "" } else { "s" },
                args.len()
            ));
        }
        for (i, (p, a)) in self.params.iter().zip(args).enumerate() {
            if let Some(t) = p.ty.filter(|t| !t.matches(a)) {
                return Err(format!(
                    "{}: argument {} ({}) must be {}, got {a}",
                    self.signature(),
                    i + 1,
                    p.name,
                    t.name()
                ));
            }
        }
        Ok(())
    }
}

/// Why a catalog change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    /// Two apps would expose the same `APP.EVENT` name (app names may contain dots).
    #[error("procedure {name} of app {app} is already a procedure of app {other}; rename an app or an event")]
    Clash {
        /// The name.
        name: String,
        /// The app being set.
        app: String,
        /// The app that has it.
        other: String,
    },
}

/// The procedures of every app, by full name.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    by_name: HashMap<String, Arc<Procedure>>,
    by_app: HashMap<String, Vec<String>>,
}

impl Catalog {
    /// An empty catalog.
    pub fn new() -> Catalog {
        Catalog::default()
    }

    /// Sets `app`'s procedures (event → parameters), replacing the ones it had.
    ///
    /// # Errors
    /// A name another app already exposes; the catalog is then unchanged.
    pub fn set_app(&mut self, app: &str, procedures: &BTreeMap<String, Vec<Param>>) -> Result<(), CatalogError> {
        for event in procedures.keys() {
            let name = format!("{app}.{event}");
            if let Some(other) = self.by_name.get(&name).filter(|p| p.app != app) {
                return Err(CatalogError::Clash { name, app: app.to_string(), other: other.app.clone() });
            }
        }
        self.remove_app(app);
        let mut names = Vec::with_capacity(procedures.len());
        for (event, params) in procedures {
            let name = format!("{app}.{event}");
            let p =
                Procedure { name: name.clone(), app: app.to_string(), event: event.clone(), params: params.clone() };
            self.by_name.insert(name.clone(), Arc::new(p));
            names.push(name);
        }
        self.by_app.insert(app.to_string(), names);
        Ok(())
    }

    /// Forgets `app`'s procedures.
    pub fn remove_app(&mut self, app: &str) {
        for name in self.by_app.remove(app).unwrap_or_default() {
            self.by_name.remove(&name);
        }
    }

    /// The procedure called `name`.
    pub fn resolve(&self, name: &str) -> Option<Arc<Procedure>> {
        self.by_name.get(name).cloned()
    }

    /// Every procedure name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.by_name.keys().cloned().collect();
        names.sort();
        names
    }

    /// Every procedure, sorted by name.
    pub fn procedures(&self) -> Vec<Arc<Procedure>> {
        let mut all: Vec<Arc<Procedure>> = self.by_name.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(list: &[&str]) -> Vec<Param> {
        list.iter().map(|s| Param::try_from(s.to_string()).unwrap()).collect()
    }

    fn procs(list: &[(&str, &[&str])]) -> BTreeMap<String, Vec<Param>> {
        list.iter().map(|(e, p)| (e.to_string(), params(p))).collect()
    }

    #[test]
    fn resolves_checks_and_replaces() {
        let mut c = Catalog::new();
        c.set_app("procs", &procs(&[("add", &["a:number", "b:number"]), ("echo", &["value"])])).unwrap();
        let add = c.resolve("procs.add").unwrap();
        assert_eq!((add.app.as_str(), add.event.as_str()), ("procs", "add"));
        assert_eq!(add.signature(), "procs.add(a: number, b: number)");
        assert!(add.check(&[json!(1), json!(2.5)]).is_ok());
        let e = add.check(&[json!(1)]).unwrap_err();
        assert!(e.contains("takes 2 arguments, got 1"), "{e}");
        let e = add.check(&[json!(1), json!("2")]).unwrap_err();
        assert!(e.contains("argument 2 (b) must be number"), "{e}");
        assert!(c.resolve("procs.echo").unwrap().check(&[json!({"any": [1]})]).is_ok());
        assert!(c.resolve("procs.nope").is_none() && c.resolve("nope.add").is_none());
        assert_eq!(c.names(), vec!["procs.add", "procs.echo"]);
        c.set_app("procs", &procs(&[("noop", &[])])).unwrap();
        assert_eq!(c.names(), vec!["procs.noop"]);
        c.remove_app("procs");
        assert!(c.names().is_empty());
    }

    #[test]
    fn clashing_names_are_refused() {
        let mut c = Catalog::new();
        c.set_app("a.b", &procs(&[("c", &[])])).unwrap();
        let e = c.set_app("a", &procs(&[("b.c", &[])])).unwrap_err();
        assert!(matches!(e, CatalogError::Clash { .. }), "{e}");
        assert_eq!(c.resolve("a.b.c").unwrap().app, "a.b");
    }
}
