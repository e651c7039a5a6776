"""Per-token routing: which steering config slot each flattened row of a step uses.

vLLM flattens the scheduled tokens of all requests into one [num_tokens, hidden] batch, in
`input_batch.req_ids` order. A row's absolute position in its sequence decides whether the
request's `apply_to` selects it: prompt positions are < the prompt length, generated tokens sit
at positions >= the prompt length (the first generated token is predicted AT the last prompt
position, so generation-only steering starts changing output from the second generated token).
Slot 0 means "not steered".
"""

from __future__ import annotations

import numpy as np

APPLY_ALL, APPLY_PROMPT, APPLY_GENERATION = 0, 1, 2
APPLY_CODES = {"all": APPLY_ALL, "prompt": APPLY_PROMPT, "generation": APPLY_GENERATION}


def token_slots(
    req_slots: np.ndarray,  # [num_reqs] config slot per request (0 = unsteered)
    req_apply_to: np.ndarray,  # [num_reqs] APPLY_* code
    num_scheduled: np.ndarray,  # [num_reqs] rows this step per request
    num_computed: np.ndarray,  # [num_reqs] tokens already in the KV/state before this step
    num_prompt: np.ndarray,  # [num_reqs] prompt length
) -> np.ndarray:
    """Slot index for every row of the step, int32 [sum(num_scheduled)]."""
    if (req_apply_to == APPLY_ALL).all():  # positions do not matter
        return np.repeat(req_slots, num_scheduled).astype(np.int32)
    req_of_row = np.repeat(np.arange(len(num_scheduled)), num_scheduled)
    starts = np.cumsum(num_scheduled) - num_scheduled
    offset_in_req = np.arange(len(req_of_row)) - starts[req_of_row]
    position = num_computed[req_of_row] + offset_in_req
    apply_to = req_apply_to[req_of_row]
    in_prompt = position < num_prompt[req_of_row]
    selected = (
        (apply_to == APPLY_ALL)
        | ((apply_to == APPLY_PROMPT) & in_prompt)
        | ((apply_to == APPLY_GENERATION) & ~in_prompt)
    )
    return np.where(selected, req_slots[req_of_row], 0).astype(np.int32)
