"""How a generation method makes images, one module per kind (`pipeline.methods.Method.kind`).

A maker is built once per job (`MAKERS[method.kind](pipe, settings, method)`) and is the job's only
dispatch on the method: the stage then calls, per batch of work items,

* `maker.load(item)`: read what `item` starts from now (decode and encode its source, read its
  mask), raising PipelineError when that is bad, so that `generate.on_bad_image` can stop the job
  or skip the image before the batch runs;
* `maker.make(batch, conditions, negative_embeds)`: the batch's images, one per item, from the
  prompt embeddings [B,77,dim] and the unconditional one (None without guidance). A maker that
  conditions on captions (`Method.captions`) is built with them (`captions=`), gets conditions None,
  makes each image's embedding itself, and says each row's prompt (`maker.prompt(item)`) and what
  it mixed (`maker.records`, into the shard's metadata).

and, before any model loads, `check(settings)` refuses settings under which the kind makes nothing
sensible. A new kind (say, one starting from an image of another class) is a new module here with
these three and a line in MAKERS.
"""

from pipeline.makers import img2img, mvc, txt2img

MAKERS = {"img2img": img2img.Img2ImgMaker, "txt2img": txt2img.Txt2ImgMaker, "mvc": mvc.MVCMaker}
