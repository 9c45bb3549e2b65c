//! [`Tags`]: a resource's tags, compact. A fleet's resources carry the same few keys, and most of their values
//! (tenant, provider, pool, fleet) repeat across thousands of them: keys and values are interned, shared
//! strings, kept in one small sorted vector per resource instead of a B-tree of owned strings. A 100,000-machine
//! world is about a third smaller (issue 23); the API is the subset of `BTreeMap<String, String>` nimbus uses.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

/// One shared copy of each tag key and value ever seen. Pruned of strings nobody holds any more when it has
/// doubled since the last pruning, so a long-running `reconcile` does not grow it without bound.
struct Interner {
    set: HashSet<Arc<str>>,
    pruned_at: usize,
}

fn intern(s: &str) -> Arc<str> {
    static INTERNER: OnceLock<Mutex<Interner>> = OnceLock::new();
    let lock = INTERNER.get_or_init(|| Mutex::new(Interner { set: HashSet::new(), pruned_at: 1024 }));
    let mut i = lock.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(a) = i.set.get(s) {
        return a.clone();
    }
    if i.set.len() >= 2 * i.pruned_at {
        i.set.retain(|a| Arc::strong_count(a) > 1);
        i.pruned_at = i.set.len().max(1024);
    }
    let a: Arc<str> = Arc::from(s);
    i.set.insert(a.clone());
    a
}

/// An interned string: one shared copy of each value. A fleet's provider, image, instance type and zone repeat
/// on every machine; shared, they cost a pointer each and stay in the cache while a plan walks the fleet.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sym(Arc<str>);

impl Sym {
    pub fn new(s: &str) -> Self {
        Sym(intern(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Sym {
    fn default() -> Self {
        Sym::new("")
    }
}

impl std::ops::Deref for Sym {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Sym {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Sym {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Sym {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Printed as a string is.
impl std::fmt::Debug for Sym {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

impl From<&str> for Sym {
    fn from(s: &str) -> Self {
        Sym::new(s)
    }
}

impl From<String> for Sym {
    fn from(s: String) -> Self {
        Sym::new(&s)
    }
}

impl From<&String> for Sym {
    fn from(s: &String) -> Self {
        Sym::new(s)
    }
}

impl From<Sym> for String {
    fn from(s: Sym) -> Self {
        s.0.to_string()
    }
}

impl PartialEq<str> for Sym {
    fn eq(&self, o: &str) -> bool {
        *self.0 == *o
    }
}

impl PartialEq<&str> for Sym {
    fn eq(&self, o: &&str) -> bool {
        *self.0 == **o
    }
}

impl PartialEq<String> for Sym {
    fn eq(&self, o: &String) -> bool {
        *self.0 == **o
    }
}

impl PartialEq<Sym> for String {
    fn eq(&self, o: &Sym) -> bool {
        **self == *o.0
    }
}

impl PartialEq<Sym> for str {
    fn eq(&self, o: &Sym) -> bool {
        *self == *o.0
    }
}

impl PartialEq<Sym> for &str {
    fn eq(&self, o: &Sym) -> bool {
        **self == *o.0
    }
}

impl serde::Serialize for Sym {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Sym {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Sym::from)
    }
}

/// In schemas, a string.
impl schemars::JsonSchema for Sym {
    fn inline_schema() -> bool {
        <String as schemars::JsonSchema>::inline_schema()
    }
    fn schema_name() -> std::borrow::Cow<'static, str> {
        <String as schemars::JsonSchema>::schema_name()
    }
    fn schema_id() -> std::borrow::Cow<'static, str> {
        <String as schemars::JsonSchema>::schema_id()
    }
    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        <String as schemars::JsonSchema>::json_schema(g)
    }
}

/// A resource's tags: keys in order, each once.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tags(Vec<(Arc<str>, Arc<str>)>);

impl Tags {
    pub fn new() -> Self {
        Tags(Vec::new())
    }

    fn find(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| (**k).cmp(key))
    }

    /// The value of `key`. A resource has a handful of tags, and nimbus's keys share their `nimbus:` prefix but
    /// not their lengths: a scan comparing lengths first touches one key's bytes, where a binary search compares
    /// the prefix three times (a 100,000-machine plan looks up a million tags).
    pub fn get(&self, key: &str) -> Option<&str> {
        if self.0.len() <= 16 {
            return self.0.iter().find(|(k, _)| k.len() == key.len() && **k == *key).map(|(_, v)| &**v);
        }
        self.find(key).ok().map(|i| &*self.0[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Sets `key` to `value`; returns the value it had.
    pub fn insert(&mut self, key: impl AsRef<str>, value: impl AsRef<str>) -> Option<String> {
        let (key, value) = (key.as_ref(), value.as_ref());
        match self.find(key) {
            Ok(i) => {
                let old = self.0[i].1.to_string();
                if *self.0[i].1 != *value {
                    self.0[i].1 = intern(value);
                }
                Some(old)
            }
            Err(i) => {
                self.0.insert(i, (intern(key), intern(value)));
                None
            }
        }
    }

    /// Removes `key`; returns its value.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        self.find(key).ok().map(|i| self.0.remove(i).1.to_string())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Keys and values, by key.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&str, &str)> + ExactSizeIterator + Clone {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &str> + ExactSizeIterator + Clone {
        self.0.iter().map(|(k, _)| &**k)
    }

    pub fn values(&self) -> impl DoubleEndedIterator<Item = &str> + ExactSizeIterator + Clone {
        self.0.iter().map(|(_, v)| &**v)
    }

    /// Keeps the tags `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &str) -> bool) {
        self.0.retain(|(k, v)| keep(k, v));
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// The keys, owned.
    pub fn into_keys(self) -> impl Iterator<Item = String> {
        self.0.into_iter().map(|(k, _)| k.to_string())
    }

    /// As owned strings.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }
}

impl<K: AsRef<str>, V: AsRef<str>> Extend<(K, V)> for Tags {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.insert(k, v);
        }
    }
}

impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for Tags {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut t = Tags::new();
        t.extend(iter);
        t
    }
}

impl<K: AsRef<str>, V: AsRef<str>, const N: usize> From<[(K, V); N]> for Tags {
    fn from(a: [(K, V); N]) -> Self {
        a.into_iter().collect()
    }
}

impl From<&BTreeMap<String, String>> for Tags {
    fn from(m: &BTreeMap<String, String>) -> Self {
        m.iter().collect()
    }
}

impl From<BTreeMap<String, String>> for Tags {
    fn from(m: BTreeMap<String, String>) -> Self {
        m.iter().collect()
    }
}

impl<'a> IntoIterator for &'a Tags {
    type Item = (&'a str, &'a str);
    type IntoIter =
        std::iter::Map<std::slice::Iter<'a, (Arc<str>, Arc<str>)>, fn(&'a (Arc<str>, Arc<str>)) -> (&'a str, &'a str)>;
    fn into_iter(self) -> Self::IntoIter {
        fn pair(p: &(Arc<str>, Arc<str>)) -> (&str, &str) {
            (&p.0, &p.1)
        }
        self.0.iter().map(pair)
    }
}

impl IntoIterator for Tags {
    type Item = (String, String);
    type IntoIter =
        std::iter::Map<std::vec::IntoIter<(Arc<str>, Arc<str>)>, fn((Arc<str>, Arc<str>)) -> (String, String)>;
    fn into_iter(self) -> Self::IntoIter {
        fn owned((k, v): (Arc<str>, Arc<str>)) -> (String, String) {
            (k.to_string(), v.to_string())
        }
        self.0.into_iter().map(owned)
    }
}

/// `tags["key"]`: the value of a key that must be there (panics otherwise, as a map's index does).
impl std::ops::Index<&str> for Tags {
    type Output = str;
    fn index(&self, key: &str) -> &str {
        self.get(key).unwrap_or_else(|| panic!("no tag `{key}`"))
    }
}

/// Printed as a map, as `BTreeMap` prints.
impl std::fmt::Debug for Tags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl serde::Serialize for Tags {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> serde::Deserialize<'de> for Tags {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        BTreeMap::<String, String>::deserialize(d).map(Tags::from)
    }
}

/// In schemas, a map of strings, as before tags were compact.
impl schemars::JsonSchema for Tags {
    fn inline_schema() -> bool {
        <BTreeMap<String, String> as schemars::JsonSchema>::inline_schema()
    }
    fn schema_name() -> std::borrow::Cow<'static, str> {
        <BTreeMap<String, String> as schemars::JsonSchema>::schema_name()
    }
    fn schema_id() -> std::borrow::Cow<'static, str> {
        <BTreeMap<String, String> as schemars::JsonSchema>::schema_id()
    }
    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        <BTreeMap<String, String> as schemars::JsonSchema>::json_schema(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_as_a_sorted_map_and_shares_its_strings() {
        let mut t = Tags::from([("b", "2"), ("a", "1")]);
        assert_eq!(t.insert("c", "3"), None);
        assert_eq!(t.insert("a", "one"), Some("1".to_string()));
        assert_eq!(t.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(t.get("a"), Some("one"));
        assert_eq!(t.get("z"), None);
        assert_eq!(t.remove("b"), Some("2".to_string()));
        assert_eq!(format!("{t:?}"), r#"{"a": "one", "c": "3"}"#);
        assert_eq!(serde_json::to_string(&t).unwrap(), r#"{"a":"one","c":"3"}"#);
        let back: Tags = serde_json::from_str(r#"{"c":"3","a":"one"}"#).unwrap();
        assert_eq!(back, t);
        // Two resources' equal values are one string.
        let (x, y) = (Tags::from([("k", "shared-value")]), Tags::from([("k", "shared-value")]));
        assert!(Arc::ptr_eq(&x.0[0].1, &y.0[0].1));
    }
}
