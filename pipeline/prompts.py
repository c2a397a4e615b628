"""The MetaMath Alpaca prompt, shared by training data and evaluation so both see the same text."""

METAMATH_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response: Let's think step by step."
)

# MetaMath's eval scripts (eval_gsm8k.py, eval_math.py) stop generation when the model starts a new turn.
METAMATH_STOP = ["Question:", "Question", "USER:", "USER", "ASSISTANT:", "ASSISTANT", "Instruction:", "Instruction",
                 "Response:", "Response"]

ANSWER_PREFIX = "The answer is: "


def metamath_prompt(instruction: str) -> str:
    return METAMATH_PROMPT.format(instruction=instruction)
