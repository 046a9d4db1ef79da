//! Builds a byte-level BPE tokenizer from a GGUF file's `tokenizer.ggml.*` metadata, the
//! way llama.cpp reads it, so our token ids equal llama.cpp's for the same file.
//!
//! Owns: the vocabulary, merges, pre-tokenizer and special tokens read from the file. Must
//! never: accept a tokenizer model it cannot reproduce exactly (only byte-level BPE).

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

/// GGUF token types that llama.cpp treats as special (control and user-defined).
const CONTROL_TOKEN: i32 = 3;
const USER_DEFINED_TOKEN: i32 = 4;

/// The special token ids a generation loop needs.
#[derive(Debug, Clone)]
pub struct SpecialTokens {
    pub eos: u32,
    pub bos_text: String,
    pub eos_text: String,
}

fn metadata<'a>(content: &'a Content, key: &str) -> anyhow::Result<&'a Value> {
    content
        .metadata
        .get(key)
        .ok_or_else(|| anyhow::anyhow!("GGUF metadata has no `{key}`"))
}

fn string_array(content: &Content, key: &str) -> anyhow::Result<Vec<String>> {
    metadata(content, key)?
        .to_vec()?
        .iter()
        .map(|v| Ok(v.to_string()?.clone()))
        .collect()
}

/// Each token's GGUF type; all normal where the file states none.
fn token_types(content: &Content, tokens: usize) -> anyhow::Result<Vec<i32>> {
    match content.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => Ok(v
            .to_vec()?
            .iter()
            .map(|t| t.to_i32())
            .collect::<Result<_, _>>()?),
        None => Ok(vec![1; tokens]),
    }
}

/// Builds the tokenizer and reads its special tokens.
pub fn from_gguf(content: &Content) -> anyhow::Result<(Tokenizer, SpecialTokens)> {
    let model = metadata(content, "tokenizer.ggml.model")?.to_string()?;
    if model != "gpt2" {
        anyhow::bail!("tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`)");
    }
    let tokens = string_array(content, "tokenizer.ggml.tokens")?;
    let merges = string_array(content, "tokenizer.ggml.merges")?;
    let token_types = token_types(content, tokens.len())?;

    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, tok)| (tok.clone(), id as u32))
        .collect();
    let merges: Vec<(String, String)> = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| anyhow::anyhow!("malformed merge `{m}`"))
        })
        .collect::<anyhow::Result<_>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow::anyhow!("building BPE: {e}"))?;

    let mut tokenizer = Tokenizer::new(bpe);
    // llama.cpp's `smollm`/`starcoder` pre-tokenizer: every digit alone, then the GPT-2 split.
    let pre = Sequence::new(vec![
        PreTokenizerWrapper::Digits(Digits::new(true)),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
    ]);
    tokenizer.with_pre_tokenizer(Some(pre));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(token_types.iter())
        .filter(|(_, t)| **t == CONTROL_TOKEN || **t == USER_DEFINED_TOKEN)
        .map(|(tok, _)| AddedToken::from(tok.clone(), true))
        .collect();
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| anyhow::anyhow!("registering special tokens: {e}"))?;

    let id_of = |key: &str| -> anyhow::Result<Option<u32>> {
        match content.metadata.get(key) {
            Some(v) => Ok(Some(v.to_u32()?)),
            None => Ok(None),
        }
    };
    let eos = id_of("tokenizer.ggml.eos_token_id")?
        .ok_or_else(|| anyhow::anyhow!("GGUF metadata has no EOS token"))?;
    let bos = id_of("tokenizer.ggml.bos_token_id")?;
    let text_of = |id: u32| tokens.get(id as usize).cloned().unwrap_or_default();
    let special = SpecialTokens {
        eos,
        bos_text: bos.map(text_of).unwrap_or_default(),
        eos_text: text_of(eos),
    };
    Ok((tokenizer, special))
}

/// The bytes each token id stands for, in id order: byte-level tokens decoded from GPT-2's
/// printable alphabet, special tokens as a 0xFF byte and their text (the form the grammar
/// matcher reserves for tokens no text can produce).
pub fn token_bytes(content: &Content) -> anyhow::Result<Vec<Vec<u8>>> {
    let tokens = string_array(content, "tokenizer.ggml.tokens")?;
    let types = token_types(content, tokens.len())?;
    let mut byte_of = vec![b'?'; 512];
    for (b, c) in byte_alphabet().iter().enumerate() {
        if let Some(slot) = byte_of.get_mut(*c as usize) {
            *slot = b as u8;
        }
    }
    Ok(tokens
        .iter()
        .enumerate()
        .map(|(i, tok)| {
            let t = types.get(i).copied().unwrap_or(1);
            if t == CONTROL_TOKEN || t == USER_DEFINED_TOKEN {
                let mut b = vec![0xFF];
                b.extend_from_slice(tok.as_bytes());
                b
            } else {
                tok.chars()
                    .map(|c| byte_of.get(c as usize).copied().unwrap_or(b'?'))
                    .collect()
            }
        })
        .collect())
}

/// GPT-2's byte-level alphabet: the character that stands for each byte.
fn byte_alphabet() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in out.iter_mut().enumerate() {
        let printable = matches!(b, 33..=126 | 161..=172 | 174..=255);
        let code = if printable {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        *slot = char::from_u32(code).unwrap_or('?');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alphabet_maps_space_and_newline_as_gpt2_does() {
        let a = byte_alphabet();
        assert_eq!(a[b' ' as usize], 'Ġ');
        assert_eq!(a[b'\n' as usize], 'Ċ');
        assert_eq!(a[b'a' as usize], 'a');
    }
}
