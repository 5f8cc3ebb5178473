"""doc_to_* functions of the local ``mmeff_yesno`` lmms-eval task (images: paths relative to the working dir)."""

from PIL import Image

SUFFIX = "\nAnswer the question using a single word or phrase."


def doc_to_visual(doc):
    with Image.open(doc["image"]) as im:
        return [im.convert("RGB")]


def doc_to_text(doc):
    return doc["question"] + SUFFIX


def process_results(doc, results):
    answer = results[0].strip().lower()
    return {"accuracy": float(answer.startswith(doc["answer"]))}
