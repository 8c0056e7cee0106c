//! Loading config files into typed documents.
//!
//! First stage of the data flow: YAML text → [`ConfigSet`] (raw, typed documents that remember their
//! [`Origin`]). A document's `apiVersion`/`kind` header is read first (from its top-level lines,
//! or by serde_yaml when it is written less plainly), then serde_yaml parses it into the struct for
//! that kind, so that type errors carry serde_yaml's exact position and field path. Nothing here
//! resolves references; that is [`crate::validate`]'s job.
//!
//! A [`ParseCache`] carried from one load to the next keeps every typed document by its text: a
//! reload parses only the documents that changed (parsing is most of a large config's load time).
//! It also keeps each file that loaded cleanly by its identity on disk ([`FileIdentity`]): a file
//! that has not changed since is not read again.

pub mod istio;
pub mod settings;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::diag::{Diagnostic, Diagnostics};
use crate::source::{Origin, Position, SourceFile};

pub use settings::GatewaySettingsSpec;

/// Files larger than this are refused before parsing: a gateway config is kilobytes, and a huge file
/// is far more likely a mistake (or an attack) than a config. Large installations split into files.
pub const MAX_FILE_BYTES: usize = 4 * 1024 * 1024;

pub const ISTIO_API_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];
pub const SLUICE_API_VERSION: &str = "sluice.dev/v1alpha1";

/// Kubernetes object metadata. `name`/`namespace`/`labels`/`annotations` are used; the bookkeeping
/// fields `kubectl get -o yaml` adds are accepted so exported objects load unchanged.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: istio::Labels,
    #[serde(default)]
    pub annotations: istio::Labels,
    #[serde(default)]
    pub uid: Option<istio::NoEffect>,
    #[serde(default)]
    pub resource_version: Option<istio::NoEffect>,
    #[serde(default)]
    pub generation: Option<istio::NoEffect>,
    #[serde(default)]
    pub creation_timestamp: Option<istio::NoEffect>,
    #[serde(default)]
    pub managed_fields: Option<istio::NoEffect>,
}

impl ObjectMeta {
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

/// One typed document with its metadata and where it came from. The parsed parts are shared with
/// the [`ParseCache`], so an unchanged document costs nothing to load again.
#[derive(Debug, Clone)]
pub struct Document<T> {
    pub metadata: Arc<ObjectMeta>,
    pub spec: Arc<T>,
    pub origin: Origin,
}

impl<T> Document<T> {
    /// `namespace/name`, the identity Istio uses for references.
    pub fn id(&self) -> String {
        format!("{}/{}", self.metadata.namespace(), self.metadata.name)
    }
}

/// Everything loaded from a set of config paths, grouped by kind, in file order.
#[derive(Debug, Clone, Default)]
pub struct ConfigSet {
    pub settings: Vec<Document<GatewaySettingsSpec>>,
    pub gateways: Vec<Document<istio::GatewaySpec>>,
    pub virtual_services: Vec<Document<istio::VirtualServiceSpec>>,
    pub destination_rules: Vec<Document<istio::DestinationRuleSpec>>,
    pub service_entries: Vec<Document<istio::ServiceEntrySpec>>,
    pub files: Vec<PathBuf>,
    /// Hash of every file's path and of each document's text and line: equal fingerprints mean the
    /// config read the same (a file skipped as unchanged on disk counts as read again).
    pub fingerprint: u64,
}

/// Documents parsed by earlier loads, by their text, and the files they came from. Give the same
/// cache to every load of a config (reloads); each load keeps only the documents and files it saw,
/// so the cache holds one config's worth.
#[derive(Debug, Default)]
pub struct ParseCache {
    documents: HashMap<TextKey, Parsed>,
    files: HashMap<PathBuf, CachedFile>,
    /// Files the last load read, and files it found unchanged and did not read.
    pub last_load: FileReads,
}

/// How many files a load read, and how many it found unchanged on disk and did not read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FileReads {
    pub read: usize,
    pub unchanged: usize,
}

impl ParseCache {
    /// The next load reads every file, changed or not: for reloads that must not trust what is on
    /// disk to be what was read (SIGHUP, the admin API, a certificate change, lost file events).
    pub fn forget_files(&mut self) {
        self.files.clear();
    }
}

/// A file as the last load read it, without a diagnostic, kept so that a load finding it unchanged
/// on disk can place its documents again without reading it.
#[derive(Debug)]
struct CachedFile {
    identity: FileIdentity,
    source: Arc<SourceFile>,
    /// Its documents (blank ones left out), in order.
    documents: Vec<PlacedDocument>,
}

#[derive(Debug, Clone)]
struct PlacedDocument {
    index: usize,
    key: TextKey,
    parsed: Parsed,
}

/// What tells that a file changed without reading it: device, inode (a file renamed into place is a
/// new one), size, and modification and change times. It is trusted only where the change time
/// is kept by this machine's kernel from this machine's clock (local filesystems, [`trusted_fs`]):
/// there it cannot be set back (`cp -p`, `touch -d` and `rsync -t` restore only the modification
/// time), and with the last change older than [`SETTLED`], a later edit, even one within the
/// timestamps' granularity of the read, shows as a later change time. On NFS the server's clock
/// stamps it, and FUSE filesystems may report the modification time for it: files there are read
/// every time. A clock stepped back by more than [`SETTLED`] between an edit and the read before
/// it could hide a same-size edit until the next one; SIGHUP reads everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdentity {
    device: u64,
    inode: u64,
    len: u64,
    modified: (i64, i64),
    changed: (i64, i64),
}

/// How long ago a file must have last changed for its identity to be trusted: above the timestamp
/// granularity of the local filesystems trusted (nanoseconds, or 1 s for ext4 with small inodes).
const SETTLED: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether `path` lies on a local filesystem whose change times this machine's kernel keeps:
/// ext2/3/4, XFS, Btrfs, tmpfs (Kubernetes secrets), overlayfs (containers).
fn trusted_fs(path: &Path) -> bool {
    use nix::sys::statfs::{
        statfs, BTRFS_SUPER_MAGIC, EXT4_SUPER_MAGIC, OVERLAYFS_SUPER_MAGIC, TMPFS_MAGIC,
        XFS_SUPER_MAGIC,
    };
    let local = [
        EXT4_SUPER_MAGIC,
        XFS_SUPER_MAGIC,
        BTRFS_SUPER_MAGIC,
        TMPFS_MAGIC,
        OVERLAYFS_SUPER_MAGIC,
    ];
    statfs(path).is_ok_and(|fs| local.contains(&fs.filesystem_type()))
}

impl FileIdentity {
    /// The identity of `path`, if it can be trusted: `None` when it cannot be stat'ed, changed too
    /// recently or lies on a filesystem not trusted.
    fn settled(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let metadata = std::fs::metadata(path).ok()?;
        if !trusted_fs(path) {
            return None;
        }
        let changed_at = std::time::UNIX_EPOCH
            + std::time::Duration::new(
                u64::try_from(metadata.ctime()).ok()?,
                u32::try_from(metadata.ctime_nsec()).ok()?,
            );
        let settled = std::time::SystemTime::now()
            .duration_since(changed_at)
            .is_ok_and(|age| age >= SETTLED);
        settled.then_some(Self {
            device: metadata.dev(),
            inode: metadata.ino(),
            len: metadata.len(),
            modified: (metadata.mtime(), metadata.mtime_nsec()),
            changed: (metadata.ctime(), metadata.ctime_nsec()),
        })
    }
}

/// A document's text, by a 64-bit hash and its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct TextKey {
    hash: u64,
    len: usize,
}

impl TextKey {
    fn of(text: &str) -> Self {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut hasher);
        Self {
            hash: hasher.finish(),
            len: text.len(),
        }
    }
}

/// A document as parsed, ready to be placed at a new [`Origin`].
#[derive(Debug, Clone)]
enum Parsed {
    Settings(Arc<ObjectMeta>, Arc<GatewaySettingsSpec>),
    Gateway(Arc<ObjectMeta>, Arc<istio::GatewaySpec>),
    VirtualService(Arc<ObjectMeta>, Arc<istio::VirtualServiceSpec>),
    DestinationRule(Arc<ObjectMeta>, Arc<istio::DestinationRuleSpec>),
    ServiceEntry(Arc<ObjectMeta>, Arc<istio::ServiceEntrySpec>),
}

/// The typed shape of a whole document of one kind.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Object<T> {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default = "Option::default")]
    spec: Option<T>,
    /// Written by Kubernetes, never by hand; carries no configuration.
    #[serde(default, rename = "status")]
    _status: Option<istio::NoEffect>,
}

/// Just enough of a document to know how to parse the rest.
#[derive(Deserialize)]
struct Header {
    #[serde(default, rename = "apiVersion")]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
}

impl ConfigSet {
    /// Loads every `*.yaml`/`*.yml` file named by `paths` (files, or directories read one level deep in
    /// name order; hidden entries such as a ConfigMap's `..data` are skipped).
    pub fn load_paths(paths: &[PathBuf]) -> (ConfigSet, Diagnostics) {
        Self::load_paths_cached(paths, &mut ParseCache::default())
    }

    /// [`Self::load_paths`], parsing only documents that `cache` does not already hold, and leaving
    /// in `cache` exactly the documents of this load.
    pub fn load_paths_cached(
        paths: &[PathBuf],
        cache: &mut ParseCache,
    ) -> (ConfigSet, Diagnostics) {
        let mut set = ConfigSet::default();
        let mut diagnostics = Diagnostics::default();
        let mut loader = Loader {
            earlier: std::mem::take(&mut cache.documents),
            now: HashMap::new(),
        };
        let mut earlier_files = std::mem::take(&mut cache.files);
        cache.last_load = FileReads::default();
        for file in expand_paths(paths, &mut diagnostics) {
            // Taken before the read: a change during it shows as a different identity next time.
            let identity = FileIdentity::settled(&file);
            // A file whose positions were looked up (for a warning) carries an index of every
            // document: it is read again rather than kept with it.
            if let Some(unchanged) = identity.and_then(|identity| {
                earlier_files
                    .remove(&file)
                    .filter(|earlier| earlier.identity == identity && !earlier.source.is_indexed())
            }) {
                set.add_unchanged(&unchanged, &mut loader, &mut diagnostics);
                cache.files.insert(file, unchanged);
                cache.last_load.unchanged += 1;
                continue;
            }
            cache.last_load.read += 1;
            match read_limited(&file) {
                Ok(text) => {
                    let source = SourceFile::new(file.clone(), text);
                    let reported = diagnostics.len();
                    let documents = set.add_text(source.clone(), &mut loader, &mut diagnostics);
                    // A file with anything to report is read again: its diagnostics come from
                    // reading it.
                    if let (Some(identity), true) = (identity, diagnostics.len() == reported) {
                        let unchanged = CachedFile {
                            identity,
                            source,
                            documents,
                        };
                        cache.files.insert(file, unchanged);
                    }
                }
                Err(message) => diagnostics.push(Diagnostic::error(
                    &file,
                    Position { line: 1, column: 1 },
                    message,
                )),
            }
        }
        cache.documents = loader.now;
        (set, diagnostics)
    }

    /// Loads config from text that did not come from disk (the built-in demo, tests).
    pub fn load_str(name: &str, text: &str) -> (ConfigSet, Diagnostics) {
        let mut set = ConfigSet::default();
        let mut diagnostics = Diagnostics::default();
        if text.len() > MAX_FILE_BYTES {
            diagnostics.push(too_large(name, text.len()));
        } else {
            let mut loader = Loader::default();
            set.add_text(
                SourceFile::new(name, text.to_string()),
                &mut loader,
                &mut diagnostics,
            );
        }
        (set, diagnostics)
    }

    /// Adds the documents of `file`, parsing those `loader` does not hold; returns them as placed.
    fn add_text(
        &mut self,
        file: Arc<SourceFile>,
        loader: &mut Loader,
        diagnostics: &mut Diagnostics,
    ) -> Vec<PlacedDocument> {
        let mut fingerprint = self.start_file(file.path());
        let mut placed = Vec::new();
        let mut real_documents = 0;
        for document in 0..file.documents().len() {
            let text = file.document_text(document);
            if is_blank_document(text) {
                continue;
            }
            real_documents += 1;
            let key = TextKey::of(text);
            let line = file.documents().get(document).map(|d| d.line_offset);
            (key, line).hash(&mut fingerprint);
            self.fingerprint = fingerprint.finish();
            let origin = Origin {
                file: file.clone(),
                document,
            };
            let parsed = match loader
                .earlier
                .remove(&key)
                .or_else(|| loader.now.get(&key).cloned())
            {
                Some(parsed) => parsed,
                None => {
                    let Some(parsed) = parse_text(&origin, text, diagnostics) else {
                        continue;
                    };
                    parsed
                }
            };
            self.place(parsed.clone(), origin, diagnostics);
            loader.now.insert(key, parsed.clone());
            placed.push(PlacedDocument {
                index: document,
                key,
                parsed,
            });
        }
        if real_documents == 0 {
            diagnostics.push(Diagnostic::error(
                file.path(),
                Position { line: 1, column: 1 },
                "file holds no documents: expected at least one object with `apiVersion` and `kind`",
            ));
        }
        placed
    }

    /// Adds the documents of a file that has not changed since a load placed them, as
    /// [`Self::add_text`] did then.
    fn add_unchanged(
        &mut self,
        file: &CachedFile,
        loader: &mut Loader,
        diagnostics: &mut Diagnostics,
    ) {
        let mut fingerprint = self.start_file(file.source.path());
        for document in &file.documents {
            let line = file
                .source
                .documents()
                .get(document.index)
                .map(|d| d.line_offset);
            (document.key, line).hash(&mut fingerprint);
            self.fingerprint = fingerprint.finish();
            let origin = Origin {
                file: file.source.clone(),
                document: document.index,
            };
            loader.earlier.remove(&document.key);
            self.place(document.parsed.clone(), origin, diagnostics);
            loader.now.insert(document.key, document.parsed.clone());
        }
    }

    /// Records the next file of the load; returns the fingerprint's hasher, to go on with its
    /// documents. The fingerprint covers each document by its key and line rather than hashing
    /// the text a second time: what lies outside documents (`---` lines, blank documents) changes
    /// nothing that loads.
    fn start_file(&mut self, path: &Path) -> std::collections::hash_map::DefaultHasher {
        let mut fingerprint = std::collections::hash_map::DefaultHasher::new();
        (self.fingerprint, path).hash(&mut fingerprint);
        self.fingerprint = fingerprint.finish();
        self.files.push(path.to_path_buf());
        fingerprint
    }

    /// Adds a parsed document at `origin`.
    fn place(&mut self, parsed: Parsed, origin: Origin, diagnostics: &mut Diagnostics) {
        fn push<T>(
            into: &mut Vec<Document<T>>,
            metadata: Arc<ObjectMeta>,
            spec: Arc<T>,
            origin: Origin,
            diagnostics: &mut Diagnostics,
        ) {
            if metadata.name.is_empty() {
                diagnostics.error(&origin, "metadata", "`metadata.name` is required");
            }
            // References are written `namespace/name`: a `/` inside either part would let two
            // different objects share one reference.
            let parts = [
                ("metadata.name", Some(metadata.name.as_str())),
                ("metadata.namespace", metadata.namespace.as_deref()),
            ];
            for (field, value) in parts {
                if value.is_some_and(|v| v.contains('/')) {
                    diagnostics.error(&origin, field, format!("`{field}` must not contain `/`"));
                }
            }
            into.push(Document {
                metadata,
                spec,
                origin,
            });
        }
        match parsed {
            Parsed::Settings(m, s) => push(&mut self.settings, m, s, origin, diagnostics),
            Parsed::Gateway(m, s) => push(&mut self.gateways, m, s, origin, diagnostics),
            Parsed::VirtualService(m, s) => {
                push(&mut self.virtual_services, m, s, origin, diagnostics)
            }
            Parsed::DestinationRule(m, s) => {
                push(&mut self.destination_rules, m, s, origin, diagnostics)
            }
            Parsed::ServiceEntry(m, s) => {
                push(&mut self.service_entries, m, s, origin, diagnostics)
            }
        }
    }
}

/// Parses one document's text, reporting what is wrong with it.
fn parse_text(origin: &Origin, text: &str, diagnostics: &mut Diagnostics) -> Option<Parsed> {
    if let Some(at) = crate::source::flow_too_deep(text) {
        diagnostics.push(Diagnostic::error(
            origin.file.path(),
            origin.file_position(at.line, at.column),
            format!(
                "nesting is deeper than {} levels",
                crate::source::MAX_FLOW_DEPTH
            ),
        ));
        return None;
    }
    let header = peek_header(text).map_or_else(|| serde_yaml::from_str::<Header>(text), Ok);
    match header {
        Ok(header) => parse_document(origin, header, diagnostics),
        Err(error) => {
            diagnostics.push(yaml_error(origin, &error));
            None
        }
    }
}

/// The documents a load may reuse (`earlier`) and those it has seen (`now`, the next cache).
#[derive(Default)]
struct Loader {
    earlier: HashMap<TextKey, Parsed>,
    now: HashMap<TextKey, Parsed>,
}

/// Checks a document's kind and apiVersion, then parses it into that kind's struct.
fn parse_document(
    origin: &Origin,
    header: Header,
    diagnostics: &mut Diagnostics,
) -> Option<Parsed> {
    let Some(kind) = header.kind.as_deref() else {
        diagnostics.error(origin, "", "document has no `kind`");
        return None;
    };
    let Some(api_version) = header.api_version.as_deref() else {
        diagnostics.error(origin, "kind", "document has no `apiVersion`");
        return None;
    };
    let expected: &[&str] = if kind == settings::KIND {
        &[SLUICE_API_VERSION]
    } else {
        &ISTIO_API_VERSIONS
    };
    let known_kind = matches!(
        kind,
        "Gateway" | "VirtualService" | "DestinationRule" | "ServiceEntry" | settings::KIND
    );
    if !known_kind {
        diagnostics.error(
            origin,
            "kind",
            format!(
                "unknown kind `{kind}`: expected Gateway, VirtualService, DestinationRule, \
                 ServiceEntry or {}",
                settings::KIND
            ),
        );
        return None;
    }
    if !expected.contains(&api_version) {
        diagnostics.error(
            origin,
            "apiVersion",
            format!(
                "apiVersion `{api_version}` is not known for kind {kind}: expected {}",
                expected.join(" or ")
            ),
        );
        return None;
    }
    match kind {
        "Gateway" => parse_typed(origin, diagnostics).map(|(m, s)| Parsed::Gateway(m, s)),
        "VirtualService" => {
            parse_typed(origin, diagnostics).map(|(m, s)| Parsed::VirtualService(m, s))
        }
        "DestinationRule" => {
            parse_typed(origin, diagnostics).map(|(m, s)| Parsed::DestinationRule(m, s))
        }
        "ServiceEntry" => parse_typed(origin, diagnostics).map(|(m, s)| Parsed::ServiceEntry(m, s)),
        _ => parse_typed(origin, diagnostics).map(|(m, s)| Parsed::Settings(m, s)),
    }
}

fn parse_typed<T: DeserializeOwned + Default>(
    origin: &Origin,
    diagnostics: &mut Diagnostics,
) -> Option<(Arc<ObjectMeta>, Arc<T>)> {
    match serde_yaml::from_str::<Object<T>>(origin.file.document_text(origin.document)) {
        Ok(object) => Some((
            Arc::new(object.metadata),
            Arc::new(object.spec.unwrap_or_default()),
        )),
        Err(error) => {
            diagnostics.push(yaml_error(origin, &error));
            None
        }
    }
}

/// Reads `apiVersion` and `kind` from a document's top-level block lines, which is how nearly every
/// config writes them, without parsing the whole document a second time. Returns `None` (and the
/// caller parses properly) for anything less plain: flow style, anchors, multi-line values.
fn peek_header(text: &str) -> Option<Header> {
    let mut api_version = None;
    let mut kind = None;
    for line in text.lines() {
        let (key, rest) = match line.split_once(':') {
            Some((key @ ("apiVersion" | "kind"), rest)) => (key, rest),
            _ => continue,
        };
        let value = rest.split(" #").next().unwrap_or("").trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(value);
        let plain = !value.is_empty()
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '/' | '-' | '_'));
        if !plain {
            return None;
        }
        let slot = if key == "kind" {
            &mut kind
        } else {
            &mut api_version
        };
        if slot.replace(value.to_string()).is_some() {
            // Written twice: let serde report the duplicate.
            return None;
        }
    }
    Some(Header {
        api_version: Some(api_version?),
        kind: Some(kind?),
    })
}

/// A document of nothing but a marker, comments and blank lines (a trailing `---`, a commented-out
/// object) holds no configuration.
fn is_blank_document(text: &str) -> bool {
    text.lines().all(|line| {
        let line = line.trim();
        line.is_empty() || line.starts_with('#') || line == "---"
    })
}

/// serde_yaml renders errors as `path: message at line L column C`; Sluice prints the position in
/// front (`file:line:col:`) and names the path as a field.
fn yaml_error(origin: &Origin, error: &serde_yaml::Error) -> Diagnostic {
    let document = origin.file.document_text(origin.document);
    let last_line = document.lines().count().max(1);
    let position = error
        .location()
        // An error at the end of input is reported on the last line, where the reader will look.
        .map(|l| origin.file_position(l.line().min(last_line), l.column()))
        .unwrap_or_else(|| origin.position_of(""));
    // Positions inside the message are relative to the document, not the file; the diagnostic
    // carries the right one in front.
    let mut text = strip_marks(&error.to_string());
    if text.contains(istio::NOT_SUPPORTED) {
        // serde_yaml names the enclosing mapping; name the field itself, found by its position.
        if let Some(path) = origin.path_at(position) {
            return Diagnostic::error(
                origin.file_name(),
                position,
                format!("`{path}` {}", istio::NOT_SUPPORTED),
            );
        }
    }
    if let Some(diagnostic) = duplicate_key_error(origin, &text) {
        return diagnostic;
    }
    let line_text = document
        .lines()
        .nth(error.location().map_or(0, |l| l.line().saturating_sub(1)))
        .unwrap_or("");
    if line_text.contains('\t') {
        text.push_str(" (this line has a tab: YAML indents with spaces only)");
    }
    let message = match text.split_once(": ") {
        Some((path, rest)) if !path.contains(' ') => {
            if rest.starts_with("is ") {
                format!("`{path}` {rest}")
            } else {
                format!("`{path}`: {rest}")
            }
        }
        _ => text,
    };
    Diagnostic::error(origin.file_name(), position, message)
}

/// serde reports a repeated key at the enclosing mapping (or nowhere); point at the repeat instead.
fn duplicate_key_error(origin: &Origin, message: &str) -> Option<Diagnostic> {
    let (path, rest) = match message.split_once(": ") {
        Some((path, rest)) if !path.contains(' ') => (path, rest),
        _ => ("", message),
    };
    let key = rest
        .strip_prefix("duplicate field `")
        .or_else(|| rest.strip_prefix("duplicate key `"))?
        .strip_suffix('`')?;
    let full = if path.is_empty() || path == "." {
        key.to_string()
    } else {
        format!("{path}.{key}")
    };
    let repeat = origin.repeat_of(&full)?;
    let first = origin.position_of(&full);
    Some(Diagnostic::error(
        origin.file_name(),
        repeat,
        format!(
            "duplicate key `{full}` (first written on line {})",
            first.line
        ),
    ))
}

/// Removes every ` at line N column M` from a serde_yaml/libyaml message.
fn strip_marks(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(" at line ") {
        out.push_str(&rest[..at]);
        let after = &rest[at + " at line ".len()..];
        let skip = after
            .find(" column ")
            .map(|c| {
                let digits = after[c + " column ".len()..]
                    .bytes()
                    .take_while(u8::is_ascii_digit)
                    .count();
                c + " column ".len() + digits
            })
            .unwrap_or(0);
        rest = &after[skip..];
    }
    out.push_str(rest);
    out
}

fn too_large(name: impl Into<PathBuf>, size: usize) -> Diagnostic {
    Diagnostic::error(
        name,
        Position { line: 1, column: 1 },
        format!(
            "file is {size} bytes, over the {MAX_FILE_BYTES}-byte limit for one config file; \
             split it into several files in a config directory"
        ),
    )
}

fn read_limited(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read file: {e}"))?;
    // Sized up front: a large config is read without regrowing (and copying) the buffer.
    let size = file.metadata().map_or(0, |m| m.len() as usize);
    let mut bytes = Vec::with_capacity(size.min(MAX_FILE_BYTES) + 1);
    // Read one byte past the limit to know the file is too large without reading all of it.
    file.take(MAX_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read file: {e}"))?;
    if bytes.len() > MAX_FILE_BYTES {
        let size = std::fs::metadata(path)
            .map(|m| m.len() as usize)
            .unwrap_or(bytes.len());
        return Err(too_large(path, size).message);
    }
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "file is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })
}

fn is_config_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

fn expand_paths(paths: &[PathBuf], diagnostics: &mut Diagnostics) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            match std::fs::read_dir(path) {
                Ok(entries) => {
                    let mut found: Vec<PathBuf> = entries
                        .filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| {
                            let hidden = p
                                .file_name()
                                .and_then(|n| n.to_str())
                                .is_some_and(|n| n.starts_with('.'));
                            !hidden && p.is_file() && is_config_file(p)
                        })
                        .collect();
                    found.sort();
                    files.extend(found);
                }
                Err(e) => diagnostics.push(Diagnostic::error(
                    path,
                    Position { line: 1, column: 1 },
                    format!("cannot read config directory: {e}"),
                )),
            }
        } else if path.exists() {
            files.push(path.clone());
        } else {
            diagnostics.push(Diagnostic::error(
                path,
                Position { line: 1, column: 1 },
                "config path does not exist",
            ));
        }
    }
    files
}
