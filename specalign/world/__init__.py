"""minidsec: a procedural, seeded miniature of DSEC driving clips with a real cross-modal gap.

scene.py   scene graphs (what is in a drive) and their 3-D motion
render.py  a small rasterizer: the scene at time t as linear radiance
camera.py  the RGB camera (exposure blur, low-light noise) of the target
events.py  an ESIM-style event camera simulator of the draft
qa.py      questions (a top-50 list) and answers in two voices
build.py   `specalign world build`: sequences -> the reference's derived layout (+ raw DSEC)
show.py    `specalign world show`: a contact sheet to see the gap
"""
