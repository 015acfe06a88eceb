//! Decoding the replies of our Lua scripts.
//!
//! Each script answers an array whose first element is a tag (`'acquired'`, `'fenced'`,
//! ...) followed by positional fields; this wrapper turns a malformed reply into a
//! `RedisError` that names the script, instead of a panic.

use redis::{ErrorKind, RedisError, Value};

/// A script's reply array.
pub struct Reply {
    script: &'static str,
    items: Vec<Value>,
}

impl Reply {
    /// Wraps the reply of `script`.
    pub fn new(script: &'static str, items: Vec<Value>) -> Self {
        Self { script, items }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when the reply is empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The first element, the tag.
    pub fn tag(&self) -> Result<&str, RedisError> {
        self.str(0)
    }

    /// Element `i` as text.
    pub fn str(&self, i: usize) -> Result<&str, RedisError> {
        match self.items.get(i) {
            Some(Value::BulkString(b)) => std::str::from_utf8(b).map_err(|_| self.bad(i)),
            Some(Value::SimpleString(s)) => Ok(s),
            _ => Err(self.bad(i)),
        }
    }

    /// Element `i` as an unsigned integer (Redis integer or decimal text).
    pub fn int(&self, i: usize) -> Result<u64, RedisError> {
        match self.items.get(i) {
            Some(Value::Int(n)) if *n >= 0 => Ok(*n as u64),
            Some(Value::BulkString(_)) | Some(Value::SimpleString(_)) => {
                self.str(i)?.parse().map_err(|_| self.bad(i))
            }
            _ => Err(self.bad(i)),
        }
    }

    /// Element `i` as optional text: empty string means absent.
    pub fn opt_str(&self, i: usize) -> Result<Option<String>, RedisError> {
        let s = self.str(i)?;
        Ok((!s.is_empty()).then(|| s.to_owned()))
    }

    /// Element `i` as an optional integer: empty string means absent.
    pub fn opt_int(&self, i: usize) -> Result<Option<u64>, RedisError> {
        if self.str(i).map(str::is_empty).unwrap_or(false) {
            return Ok(None);
        }
        self.int(i).map(Some)
    }

    /// The error for a tag this code does not know.
    pub fn unexpected(&self, tag: &str) -> RedisError {
        RedisError::from((
            ErrorKind::UnexpectedReturnType,
            "unexpected script reply",
            format!("script {} answered tag {tag:?}", self.script),
        ))
    }

    fn bad(&self, i: usize) -> RedisError {
        RedisError::from((
            ErrorKind::UnexpectedReturnType,
            "malformed script reply",
            format!(
                "script {} element {i} is {:?}",
                self.script,
                self.items.get(i)
            ),
        ))
    }
}
