"""Chat-style prompts with a speech placeholder, and answer targets.

A prompt is rendered with the LLM's chat template when the tokenizer has one,
otherwise with a plain ``User: ... / Assistant:`` template. For spoken input the
rendered prompt is split at the placeholder: the speech embeddings are spliced
between the prefix and the suffix ids. For text input the question text takes
the placeholder's place, so text and speech go through the same template.

Authors
 * speechbrain-sllm developers 2026
"""

SPEECH_PLACEHOLDER = "<|speech|>"


class ChatPrompt:
    """Builds prompt and answer token ids for spoken and text questions.

    Arguments
    ---------
    tokenizer : HFTokenizer or SentencePieceTokenizer
        The LLM's tokenizer adapter.
    instruction : str
        User turn; must contain ``{question}``, which is replaced by the
        speech placeholder (spoken input) or the question text (text input).
    system_prompt : str or None
        Optional system turn (chat templates only).
    use_chat_template : bool
        Use the tokenizer's chat template when it has one.
    plain_template : str
        Template used without a chat template; must contain ``{content}``.

    Example
    -------
    >>> import tempfile
    >>> from speechbrain_sllm.data.tokenizers import train_sentencepiece
    >>> tok = train_sentencepiece(["User: what is up\\nAssistant: sky"] * 50,
    ...     tempfile.mkdtemp(), vocab_size=30)
    >>> prompt = ChatPrompt(tok)
    >>> prefix, suffix = prompt.speech_prompt()
    >>> tok.decode(prefix), tok.decode(suffix)
    ('User:', 'Assistant:')
    >>> tok.decode(prompt.text_prompt("what is up"))
    'User: what is up Assistant:'
    >>> prompt.answer_ids("sky")[-1] == tok.eos_id
    True
    """

    def __init__(
        self,
        tokenizer,
        instruction="{question}",
        system_prompt=None,
        use_chat_template=True,
        plain_template="User: {content}\nAssistant:",
    ):
        if "{question}" not in instruction:
            raise ValueError(
                f"ChatPrompt: instruction {instruction!r} must contain '{{question}}' "
                "where the spoken or written question goes."
            )
        if "{content}" not in plain_template:
            raise ValueError(
                f"ChatPrompt: plain_template {plain_template!r} must contain '{{content}}'."
            )
        self.tokenizer = tokenizer
        self.instruction = instruction
        self.system_prompt = system_prompt
        self.use_chat = use_chat_template and tokenizer.has_chat_template
        self.plain_template = plain_template
        self._speech_prompt = None

    def render(self, question):
        """Renders the full prompt text for ``question``.

        Arguments
        ---------
        question : str
            Question text or the speech placeholder.

        Returns
        -------
        str
            The prompt, ending where the answer starts.
        """
        content = self.instruction.format(question=question)
        if not self.use_chat:
            return self.plain_template.format(content=content)
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": content})
        return self.tokenizer.render_chat(messages)

    def _ids(self, text, leading_bos):
        ids = self.tokenizer.encode(text) if text else []
        if leading_bos and not self.use_chat and self.tokenizer.bos_id is not None:
            ids = [self.tokenizer.bos_id] + ids
        return ids

    def speech_prompt(self):
        """Prefix and suffix ids around the speech embeddings (same for all items).

        Returns
        -------
        prefix : list of int
            Ids before the speech.
        suffix : list of int
            Ids after the speech, ending where the answer starts.
        """
        if self._speech_prompt is None:
            before, after = self.render(SPEECH_PLACEHOLDER).split(SPEECH_PLACEHOLDER)
            self._speech_prompt = (self._ids(before, True), self._ids(after, False))
        return self._speech_prompt

    def text_prompt(self, question):
        """Prompt ids for a written question.

        Arguments
        ---------
        question : str
            The question text.

        Returns
        -------
        list of int
        """
        if not question or not question.strip():
            raise ValueError("ChatPrompt.text_prompt: empty question text.")
        return self._ids(self.render(question), True)

    def answer_ids(self, answer):
        """Target ids of an answer, terminated by eos.

        Arguments
        ---------
        answer : str
            The reference answer.

        Returns
        -------
        list of int
        """
        if not answer or not answer.strip():
            raise ValueError("ChatPrompt.answer_ids: empty answer text.")
        return self.tokenizer.encode(answer) + [self.tokenizer.eos_id]
