//! The Node.js prototype's wire dialect, spoken beside v1 when the server runs with
//! `SEED_DIALECT=true`, so that an unchanged prototype client bids, follows the price and
//! sees the winner.
//!
//! Commands, on the same command channel: `{"tipo":"lance","productId","nome","valor"}`,
//! with `valor` a JSON number in whole currency units (cents as a fraction). A dialect bid
//! becomes an ordinary [`Bid`]: the auction whose id is `productId`, the bidder `nome`, the
//! amount `valor` in minor units exactly (a value with more than two decimals, or outside
//! the v1 range, is refused as malformed), and a `bid_id` derived from the message
//! (`seed-<nome>-<cents>`), so a duplicate delivery is judged once. The prototype's
//! `iniciar` and `finalizar` stay refused: opening and closing are admin operations.
//!
//! Events, published next to each v1 event that has a counterpart (no `"v"`, so v1 clients
//! skip them): `inicio` for `auction_opened`, `lance` for `bid_accepted`, `fim` for
//! `auction_closed`, with amounts in whole units and `mensagem` in Portuguese as the
//! prototype printed them. Rejections have no counterpart (the prototype had none).

use serde_json::{Map, Number, Value, json};

use super::{Bid, Event, MAX_AMOUNT, MAX_BIDDER_LEN, Malformed, WireError, check_token};
use crate::keyspace::{AuctionId, truncate};

/// Whether `payload` is a dialect message (an object with `"tipo"` and no `"v"`): what a
/// v1 client skips quietly on the event channel.
pub fn is_dialect(payload: &[u8]) -> bool {
    serde_json::from_slice::<Map<String, Value>>(payload)
        .is_ok_and(|o| o.contains_key("tipo") && !o.contains_key("v"))
}

/// The dialect bid in `obj` (an object with `"tipo"`).
pub(super) fn bid_from(obj: &Map<String, Value>) -> Result<Bid, Box<Malformed>> {
    let auction_id = obj
        .get("productId")
        .and_then(Value::as_str)
        .and_then(|s| AuctionId::parse(s).ok());
    let bidder = obj
        .get("nome")
        .and_then(Value::as_str)
        .filter(|s| check_token("nome", s, MAX_BIDDER_LEN).is_ok())
        .map(str::to_owned);
    let fail = |error| {
        Box::new(Malformed {
            error,
            bid_id: None,
            bidder: bidder.clone(),
            auction_id: auction_id.clone(),
        })
    };
    let bad = |field, problem: String| fail(WireError::BadField { field, problem });
    match obj.get("tipo").and_then(Value::as_str) {
        Some("lance") => {}
        Some(tipo @ ("iniciar" | "finalizar")) => {
            return Err(fail(WireError::UnknownType(format!(
                "\"{tipo}\" (the prototype's {tipo} is refused: open and close auctions with the admin API, AuctionAdmin/OpenAuction and CloseAuction)"
            ))));
        }
        other => {
            let shown = other.map_or("(not a string)".into(), |t| truncate(t, 40));
            return Err(fail(WireError::UnknownType(format!(
                "tipo {shown:?} (the prototype dialect accepts only \"lance\")"
            ))));
        }
    }
    let Some(auction_id) = auction_id.clone() else {
        return Err(bad(
            "productId",
            "missing, or not 1-64 characters of A-Z a-z 0-9 _ -".into(),
        ));
    };
    let Some(bidder) = bidder.clone() else {
        return Err(bad(
            "nome",
            format!("missing, or not 1-{MAX_BIDDER_LEN} characters of A-Z a-z 0-9 _ . : @ -"),
        ));
    };
    let amount = match obj.get("valor") {
        Some(Value::Number(n)) => cents(n).map_err(|p| bad("valor", p))?,
        _ => return Err(bad("valor", "missing, or not a JSON number".into())),
    };
    Ok(Bid {
        auction_id,
        bid_id: format!("seed-{bidder}-{amount}"),
        bidder,
        amount,
        max_amount: None,
        traceparent: None,
        sig: None,
    })
}

/// Whole units with at most two decimals, as minor units, exactly. The number's shortest
/// decimal form is parsed, never multiplied as a float: 0.1 + 0.2 arrives as
/// 0.30000000000000004 and is refused, 41.99 is 4199.
fn cents(n: &Number) -> Result<u64, String> {
    let text = n.to_string();
    let problem = || {
        format!(
            "{text} is not an amount in whole units with at most two decimals, between 0.01 and {}",
            MAX_AMOUNT / 100
        )
    };
    if text.contains(['e', 'E', '-']) {
        return Err(problem());
    }
    let (whole, fraction) = text.split_once('.').unwrap_or((&text, ""));
    let fraction = fraction.trim_end_matches('0');
    if fraction.len() > 2 || whole.is_empty() || whole.len() > 16 {
        return Err(problem());
    }
    let whole: u64 = whole.parse().map_err(|_| problem())?;
    let fraction: u64 = format!("{fraction:0<2}").parse().map_err(|_| problem())?;
    let amount = whole.checked_mul(100).and_then(|w| w.checked_add(fraction));
    match amount {
        Some(a) if a > 0 && a <= MAX_AMOUNT => Ok(a),
        _ => Err(problem()),
    }
}

/// Minor units as the prototype's whole-unit JSON number: an integer when whole, else the
/// nearest double of the decimal value (whose shortest form is that decimal).
fn units(amount: u64) -> Value {
    if amount.is_multiple_of(100) {
        Value::from(amount / 100)
    } else {
        Number::from_f64(amount as f64 / 100.0).map_or(Value::Null, Value::Number)
    }
}

/// The dialect event published next to `event`, if it has one.
pub fn event_json(event: &Event) -> Option<String> {
    let value = match event {
        Event::AuctionOpened {
            auction_id, item, ..
        } => json!({
            "tipo": "inicio",
            "productId": auction_id,
            "mensagem": format!("Leilão iniciado: {item}"),
            "lanceAtual": 0,
        }),
        Event::BidAccepted {
            auction_id,
            bidder,
            amount,
            ..
        } => json!({
            "tipo": "lance",
            "nome": bidder,
            "valor": units(*amount),
            "productId": auction_id,
            "lanceAtual": units(*amount),
            "mensagem": format!("Novo lance de {bidder}: R${}", units(*amount)),
        }),
        Event::AuctionClosed {
            auction_id,
            winner,
            amount,
            ..
        } => {
            let mensagem = match (winner, amount) {
                (Some(w), Some(a)) => {
                    format!("Leilão finalizado! Vencedor: {w} com R${}", units(*a))
                }
                _ => "Leilão finalizado! Sem vencedor.".to_owned(),
            };
            json!({
                "tipo": "fim",
                "vencedor": winner,
                "lance": amount.map(units),
                "productId": auction_id,
                "mensagem": mensagem,
            })
        }
        Event::BidRejected { .. } => return None,
    };
    Some(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::decode_any;

    fn decode(raw: &str) -> Result<Bid, Box<Malformed>> {
        decode_any(raw.as_bytes(), true)
    }

    #[test]
    fn a_prototype_bid_becomes_a_bid_in_cents_with_a_derived_id() {
        let bid =
            decode(r#"{"tipo":"lance","productId":"produto1","nome":"cliente-1","valor":41.99}"#)
                .expect("valid");
        assert_eq!(bid.auction_id.as_str(), "produto1");
        assert_eq!(bid.bidder, "cliente-1");
        assert_eq!(bid.amount, 4199);
        assert_eq!(bid.bid_id, "seed-cliente-1-4199");
        let again =
            decode(r#"{"valor":41.99,"nome":"cliente-1","tipo":"lance","productId":"produto1"}"#)
                .expect("valid");
        assert_eq!(
            again.bid_id, bid.bid_id,
            "the same bid delivered twice is one bid"
        );
        for (valor, cents) in [
            ("7", 700),
            ("12.5", 1250),
            ("0.01", 1),
            ("100.10", 10010),
            ("1e3", 100_000),
        ] {
            let raw = format!(r#"{{"tipo":"lance","productId":"p","nome":"n","valor":{valor}}}"#);
            assert_eq!(decode(&raw).expect(valor).amount, cents, "{valor}");
        }
    }

    #[test]
    fn inexact_or_out_of_range_amounts_and_admin_commands_are_refused() {
        for valor in [
            "0.30000000000000004",
            "1.005",
            "0",
            "-5",
            "\"5\"",
            "null",
            "10000000000000.01",
        ] {
            let raw = format!(r#"{{"tipo":"lance","productId":"p","nome":"n","valor":{valor}}}"#);
            let err = decode(&raw).expect_err(valor);
            assert!(
                matches!(err.error, WireError::BadField { field: "valor", .. }),
                "{valor}: {err:?}"
            );
            assert_eq!(err.bidder.as_deref(), Some("n"));
        }
        for tipo in ["iniciar", "finalizar", "inicio"] {
            let raw = format!(r#"{{"tipo":"{tipo}","productId":"p"}}"#);
            assert_eq!(decode(&raw).expect_err(tipo).error.reason(), "unknown_type");
        }
        let off = decode_any(
            br#"{"tipo":"lance","productId":"p","nome":"n","valor":5}"#,
            false,
        );
        assert_eq!(
            off.expect_err("dialect off").error.reason(),
            "unsupported_version"
        );
    }

    #[test]
    fn events_read_as_the_prototype_printed_them() {
        let accepted = Event::BidAccepted {
            auction_id: "produto1".into(),
            seq: 3,
            bid_id: "b".into(),
            bidder: "ana".into(),
            amount: 4150,
            next_min: 4160,
            traceparent: None,
            proxy: false,
            deadline_ms: None,
        };
        let v: Value = serde_json::from_str(&event_json(&accepted).expect("lance")).expect("json");
        assert_eq!(v["tipo"], "lance");
        assert_eq!(v["valor"], 41.5);
        assert_eq!(v["lanceAtual"], 41.5);
        assert_eq!(v["mensagem"], "Novo lance de ana: R$41.5");
        assert!(v.get("v").is_none(), "v1 clients skip dialect events");
        let closed = Event::AuctionClosed {
            auction_id: "produto1".into(),
            seq: 9,
            winner: Some("ana".into()),
            amount: Some(4200),
            bid_id: Some("b".into()),
            bid_count: 4,
            closed_at_ms: 1,
        };
        let v: Value = serde_json::from_str(&event_json(&closed).expect("fim")).expect("json");
        assert_eq!(v["vencedor"], "ana");
        assert_eq!(v["lance"], 42);
        assert_eq!(v["mensagem"], "Leilão finalizado! Vencedor: ana com R$42");
    }
}
