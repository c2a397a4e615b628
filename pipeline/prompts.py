"""The MetaMath Alpaca prompts: one for training rows, one for evaluation.

MetaMath's and LoRA-XS's training code (train_math.py / main_math_tuning.py) use the Alpaca header ending
`### Response:` and the target `<response><eos>` right after it; `Let's think step by step.` is appended only in
their eval scripts. Both are kept exactly so a model trained here sees what the published recipe's model saw.
"""

ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
METAMATH_TRAIN_PROMPT = ALPACA_HEADER
METAMATH_PROMPT = ALPACA_HEADER + " Let's think step by step."  # eval

# MetaMath's eval scripts (eval_gsm8k.py, eval_math.py) stop generation when the model starts a new turn.
METAMATH_STOP = ["Question:", "Question", "USER:", "USER", "ASSISTANT:", "ASSISTANT", "Instruction:", "Instruction",
                 "Response:", "Response"]

ANSWER_PREFIX = "The answer is: "


def metamath_prompt(instruction: str) -> str:
    """The eval prompt (ends `### Response: Let's think step by step.`)."""
    return METAMATH_PROMPT.format(instruction=instruction)


def metamath_train_prompt(instruction: str) -> str:
    """The training prompt (ends `### Response:`); the response follows directly, then EOS."""
    return METAMATH_TRAIN_PROMPT.format(instruction=instruction)
