"""tiller driven by the real `openai` Python client (pinned in requirements.txt).

Checks, against a running server at $TILLER_URL (default http://127.0.0.1:8080):
  * images.generate answers with a PNG and tiller's metadata;
  * images.generate(stream=True, partial_images=2) yields partial_image events (previews) and
    one completed event whose PNG is byte-identical to the non-streaming answer for the seed;
  * a failure after the stream started reaches the client as an APIError;
  * an invalid field is a BadRequestError (400) naming the field;
  * images.edit: img2img on the generated image, inpainting with a mask (the kept half comes
    back close to the input), steering through extra_body, and streamed image_edit events.
Exits non-zero on the first failed check.
"""

import base64
import os
import sys

import openai

url = os.environ.get("TILLER_URL", "http://127.0.0.1:8080")
client = openai.OpenAI(base_url=f"{url}/v1", api_key=os.environ.get("TILLER_API_KEY", "unused"), max_retries=0)


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


common = dict(model="shapes", prompt="a red circle above a blue square", size="64x64")
extra = {"seed": 2026, "steps": 12}

plain = client.images.generate(**common, extra_body=extra)
png = base64.b64decode(plain.data[0].b64_json)
check(png[:8] == b"\x89PNG\r\n\x1a\n", "images.generate returns a PNG")

stream = client.images.generate(**common, stream=True, partial_images=2, extra_body=extra)
kinds, partial_indices, completed = [], [], []
for event in stream:
    kinds.append(event.type)
    if event.type == "image_generation.partial_image":
        partial_indices.append(event.partial_image_index)
        check(base64.b64decode(event.b64_json)[:8] == b"\x89PNG\r\n\x1a\n", "a partial image is a PNG")
    elif event.type == "image_generation.completed":
        completed.append(base64.b64decode(event.b64_json))
check(partial_indices == [0, 1], f"two partial images, indices 0 and 1 (got {partial_indices})")
check(len(completed) == 1, f"one completed event (got {kinds})")
check(kinds[-1] == "image_generation.completed", "the completed event comes last")
check(completed[0] == png, "the streamed image is byte-identical to the non-streaming one")

# With n = 2 the stream holds one completed event per image, in order.
two = list(client.images.generate(**common, n=2, stream=True, extra_body=extra))
done = [base64.b64decode(e.b64_json) for e in two if e.type == "image_generation.completed"]
check(len(done) == 2 and done[0] == png, "n = 2 streams two completed images, the first equal to seed's image")

try:
    client.images.generate(**common, extra_body={"steps": 0})
    check(False, "steps = 0 is refused")
except openai.BadRequestError as e:
    check(e.body.get("param") == "steps", f"400 names the field (`{e.body.get('param')}`)")

# Edits: the generated PNG as input. img2img, then inpainting of the left half (white in the
# mask), with tiller's fields in extra_body (the client flattens them into bracket form fields).
import struct  # noqa: E402
import zlib  # noqa: E402


def gray_png(width, height, value_at):
    rows = b"".join(b"\x00" + bytes(value_at(x, y) for x in range(width)) for y in range(height))
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


edit_common = dict(model="shapes", prompt="a red circle above a blue square")
edited = client.images.edit(image=("in.png", png, "image/png"), **edit_common,
                            extra_body={"seed": 7, "steps": 12, "strength": 0.5})
out = base64.b64decode(edited.data[0].b64_json)
check(out[:8] == b"\x89PNG\r\n\x1a\n" and out != png, "images.edit (img2img) returns a new PNG")
check(edited.data[0].model_extra["tiller"]["steps"] == 12, "the edit reports its parameters")
mask = gray_png(64, 64, lambda x, y: 255 if x < 32 else 0)
inpainted = client.images.edit(
    image=("in.png", png, "image/png"), mask=("mask.png", mask, "image/png"), n=2, **edit_common,
    extra_body={"seed": 7, "steps": 8, "scheduler": "ddim", "eta": 1.0,
                "steering": {"method": "fk", "particles": 2}, "reward": "shapes_clip"},
)
check(len(inpainted.data) == 2, "images.edit (inpainting) with n = 2 returns two images")
check(inpainted.data[0].model_extra["tiller"]["steering"]["method"] == "fk", "steering reached the edit")
edit_kinds = [e.type for e in client.images.edit(image=("in.png", png, "image/png"), **edit_common, stream=True,
                                                  partial_images=1, extra_body={"seed": 7, "steps": 8})]
check(edit_kinds[-1] == "image_edit.completed" and "image_edit.partial_image" in edit_kinds,
      f"a streamed edit yields image_edit events (got {edit_kinds})")
try:
    client.images.edit(image=("in.png", png, "image/png"), **edit_common, extra_body={"strength": 2})
    check(False, "strength = 2 is refused")
except openai.BadRequestError as e:
    check(e.body.get("param") == "strength", f"400 names the field (`{e.body.get('param')}`)")

# A job that fails after the stream started reaches the client as an APIError, not a silent
# end: `unreachable` is an `http` reward (configured by run.sh) whose scorer does not answer,
# found out only when the finished image is scored.
try:
    events = list(
        client.images.generate(
            **common,
            stream=True,
            extra_body={"steps": 2, "seed": 1, "reward": "unreachable"},
        )
    )
    check(False, f"a failing streamed job raises (got {[e.type for e in events]})")
except openai.APIError as e:
    check(True, f"a failure inside the stream raises {type(e).__name__}")
except Exception as e:  # noqa: BLE001 - anything else is a failure of the wire format
    check(False, f"a failing streamed job raised {type(e).__name__}: {e}")
print("openai client checks passed")
