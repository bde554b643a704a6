# Fixed work for the Python interpreter in benches/real_programs.py: builds
# and drops containers of many sizes, as an interpreter's heap grows and
# shrinks (pymalloc arenas, the list and dict resizes that realloc moves).
import json

words = [f"w{i * 7919 % 100003:05d}" for i in range(120000)]
index = {}
for i, w in enumerate(words):
    index.setdefault(w[:4], []).append(i)
text = json.dumps(index)
back = json.loads(text)
big = [list(range(n)) for n in range(0, 3000, 7)]
del big
pairs = sorted(zip(words, range(len(words))), key=lambda p: p[0][::-1])
total = sum(len(v) for v in back.values()) + len(pairs) + len(text)
print(total)
