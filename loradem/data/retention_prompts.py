"""The builtin retention prompts: everyday instructions no demo source and no anchor prompt asks.

    from loradem.data.retention_prompts import PROMPTS   # 40 strings, each asked as one user turn

`eval.retention.prompts: builtin` scores every report row on these
(`loradem.evaluate.retention`). They are a fixed list, not generated: none
comes from the anchor templates of `loradem.data.anchors` (a test checks that
none is an anchor prompt), and none asks to add, subtract, sort, reverse or
capitalize. Kept as a module so that it ships inside the package.
"""

PROMPTS: tuple[str, ...] = (
    'Give me three tips for staying focused while studying.',
    'Write a short thank-you note to a neighbor who watered my plants.',
    'Explain what a rainbow is to a five-year-old.',
    'Suggest a name for a small bakery.',
    'What should I pack for a weekend camping trip?',
    'Describe the smell of fresh bread in one sentence.',
    'How do I boil an egg?',
    'Write a haiku about autumn leaves.',
    'Why do we need sleep?',
    'List three things to do on a rainy afternoon.',
    'Give me a simple recipe for a fruit salad.',
    'How can I start a conversation with a new coworker?',
    'Explain why the sky looks blue.',
    'Write a two-line poem about a cat.',
    'How can I save water at home?',
    'What is the difference between weather and climate?',
    'Recommend a hobby for someone who likes being outdoors.',
    'Summarize the story of Little Red Riding Hood in two sentences.',
    'Write an email subject line for a team lunch invitation.',
    'Name the three primary colors.',
    'How do plants make their food?',
    'Give me an encouraging message for a Monday morning.',
    'Explain what a budget is.',
    'What can I do if I feel nervous before a presentation?',
    'Describe a sunset over the ocean.',
    'Tell me a fun fact about octopuses.',
    'How do I make a cup of tea?',
    'Write a short riddle for a child.',
    'What is the purpose of a seatbelt?',
    'Suggest three healthy breakfast ideas.',
    'Explain how a compass works.',
    'Why is recycling useful?',
    'Write a friendly reminder to return a library book.',
    "How can I remember people's names better?",
    'Describe the sound of rain on a roof.',
    'What is photosynthesis, in simple words?',
    'Give two reasons to learn a second language.',
    'Write a birthday message for a grandmother.',
    'How does a refrigerator keep food cold?',
    'What are good manners at the dinner table?',
)
