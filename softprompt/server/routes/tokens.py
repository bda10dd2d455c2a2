"""vLLM's ``POST /tokenize`` and ``POST /detokenize``: the token ids a prompt or a chat
conversation becomes (exactly those /v1/completions and /v1/chat/completions run after the soft
prompt's virtual tokens), and the text of token ids. With the API key, like /v1/*."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from softprompt.runtime.chat import chat_text, no_template_message
from softprompt.runtime.requests import RequestError, to_ids

from ..chat_protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from ..deps import require_key, server_state
from ..errors import APIError
from ..state import ServerState

router = APIRouter()


@router.post("/tokenize", dependencies=[Depends(require_key)])
async def tokenize(body: TokenizeRequest, st: ServerState = Depends(server_state)) -> TokenizeResponse:
    """``prompt`` (text) or ``messages`` (through the model's chat template) -> token ids."""
    rt = st.runtime()
    prompt = None if body.model is None else st.prompt_for(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "send exactly one of prompt (text) or messages (a chat)",
                       param="prompt" if body.prompt is None else "messages")
    try:
        if body.messages is not None:
            if rt.tokenizer.chat_template is None:
                raise APIError(400, no_template_message(rt.tokenizer), param="model",
                               code="chat_template_missing")
            text = chat_text(rt.tokenizer, body.messages, body.add_generation_prompt)
            special = bool(body.add_special_tokens)  # default false: the template wrote them
        else:
            text = body.prompt
            special = body.add_special_tokens is not False  # default true, as completions
        ids = to_ids(text, rt.tokenizer, special, "prompt", rt.info.vocab_size)
    except RequestError as e:
        raise APIError(400, str(e), param="messages" if body.messages is not None else "prompt") from None
    sp = rt.prompts.get(prompt) if prompt is not None else None
    strs = None
    if body.return_token_strs:
        strs = [rt.tokenizer.tok.id_to_token(i) or "" for i in ids]
    return TokenizeResponse(count=len(ids), tokens=ids, token_strs=strs,
                            max_model_len=rt.info.max_positions - (sp.num_virtual_tokens if sp else 0))


@router.post("/detokenize", dependencies=[Depends(require_key)])
async def detokenize(body: DetokenizeRequest,
                     st: ServerState = Depends(server_state)) -> DetokenizeResponse:
    """Token ids -> text (special tokens kept, so it inverts /tokenize)."""
    rt = st.runtime()
    if body.model is not None:
        st.prompt_for(body.model)
    try:
        ids = to_ids(body.tokens, rt.tokenizer, False, "tokens", rt.info.vocab_size)
    except RequestError as e:
        raise APIError(400, str(e), param="tokens") from None
    if rt.tokenizer.tok is None:
        raise APIError(400, f"model {st.base_id!r} has no tokenizer: token ids cannot be decoded",
                       param="model")
    return DetokenizeResponse(prompt=rt.tokenizer.decode(ids, skip_special=False))
