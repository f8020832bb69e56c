//! The scrape endpoint's request parser (sans-IO): just enough HTTP/1.x to route a `GET`.
//! Any input gives a route or a typed error, never a panic (fuzz target `http_request`).

use thiserror::Error;

/// Longest request head (request line and headers) accepted.
pub const HEAD_BYTES_MAX: usize = 8 << 10;

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /metrics`: the Prometheus text exposition.
    Metrics,
    /// `GET /`: a pointer to `/metrics`.
    Index,
    /// Any other path (answered 404).
    NotFound(String),
}

/// Why a request head cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HttpError {
    /// The blank line ending the head has not arrived yet: read more.
    #[error("the request head is incomplete")]
    Incomplete,
    /// The head is longer than [`HEAD_BYTES_MAX`].
    #[error("the request head exceeds {HEAD_BYTES_MAX} bytes")]
    TooLarge,
    /// The request line is not `METHOD SP PATH SP HTTP/1.x`.
    #[error("malformed request line")]
    Malformed,
    /// A method other than GET or HEAD.
    #[error("method {0} is not allowed (GET or HEAD only)")]
    Method(String),
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What to answer.
    pub route: Route,
    /// `HEAD`: the headers without the body.
    pub head_only: bool,
}

/// Parses the bytes read so far from a connection.
///
/// # Errors
/// [`HttpError::Incomplete`] until the head's blank line arrives; the others for heads that
/// cannot be served.
pub fn parse(buffer: &[u8]) -> Result<Request, HttpError> {
    let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") else {
        return Err(if buffer.len() >= HEAD_BYTES_MAX { HttpError::TooLarge } else { HttpError::Incomplete });
    };
    if end > HEAD_BYTES_MAX {
        return Err(HttpError::TooLarge);
    }
    let line_end = buffer[..end].iter().position(|&byte| byte == b'\r').unwrap_or(end);
    let line = std::str::from_utf8(&buffer[..line_end]).map_err(|_| HttpError::Malformed)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed);
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Err(HttpError::Malformed);
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        other => return Err(HttpError::Method(other.chars().take(16).collect())),
    };
    let path = target.split('?').next().unwrap_or(target);
    let route = match path {
        "/metrics" => Route::Metrics,
        "/" => Route::Index,
        other => Route::NotFound(other.chars().take(256).collect()),
    };
    Ok(Request { route, head_only })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_gets_and_rejects_the_rest() {
        let get = parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(get, Request { route: Route::Metrics, head_only: false });
        assert_eq!(parse(b"HEAD /?a=b HTTP/1.0\r\n\r\n").unwrap(), Request { route: Route::Index, head_only: true });
        assert_eq!(parse(b"GET /x HTTP/1.1\r\n\r\n").unwrap().route, Route::NotFound("/x".into()));
        assert_eq!(parse(b"GET /metrics HTTP/1.1\r\nHost"), Err(HttpError::Incomplete));
        assert_eq!(parse(b"POST /metrics HTTP/1.1\r\n\r\n"), Err(HttpError::Method("POST".into())));
        assert_eq!(parse(b"GET  /metrics HTTP/1.1\r\n\r\n"), Err(HttpError::Malformed));
        assert_eq!(parse(b"GET metrics HTTP/1.1\r\n\r\n"), Err(HttpError::Malformed));
        assert_eq!(parse(b"\xff\xfe / HTTP/1.1\r\n\r\n"), Err(HttpError::Malformed));
        assert_eq!(parse(&vec![b'a'; HEAD_BYTES_MAX]), Err(HttpError::TooLarge));
    }
}
