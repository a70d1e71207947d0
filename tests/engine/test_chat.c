/*
 * test_chat.c - chat templates produce the exact text each family expects.
 */
#include <criterion/criterion.h>
#include <string.h>

#include "engine/sample/chat.h"

static const chat_msg conv[] = {
    {"system", "Be brief."},
    {"user", "Hi"},
    {"assistant", "Hello!"},
    {"user", "Bye"},
};

static void expect(const char *tmpl, const char *want, int want_bos)
{
    char out[1024], err[128];
    int bos = -1;
    long n = chat_format(tmpl, conv, 4, 1, out, sizeof out, &bos, err, sizeof err);
    cr_assert_eq(n, (long)strlen(want), "%s: %s", tmpl, out);
    cr_assert_str_eq(out, want);
    cr_assert_eq(bos, want_bos);
}

Test(chat, chatml)
{
    expect("chatml",
           "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
           "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
           "<|im_start|>assistant\n", 0);
}

Test(chat, llama3)
{
    expect("llama3",
           "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
           "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
           "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
           "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
           "<|start_header_id|>assistant<|end_header_id|>\n\n", 1);
}

Test(chat, llama2)
{
    expect("llama2",
           "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s>"
           "<s>[INST] Bye [/INST]", 1);
}

Test(chat, zephyr)
{
    expect("zephyr",
           "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n"
           "<|user|>\nBye</s>\n<|assistant|>\n", 0);
}

/* Expected strings rendered from Gemma-3's official Jinja template
 * (google/gemma-3-*-it tokenizer_config.json) with jinja2: BOS spelled out,
 * no system role (its text + blank line opens the first user turn),
 * assistant -> "model", content trimmed. */
Test(chat, gemma)
{
    expect("gemma",
           "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
           "<start_of_turn>model\nHello!<end_of_turn>\n"
           "<start_of_turn>user\nBye<end_of_turn>\n"
           "<start_of_turn>model\n", 1);
}

static void expect_msgs(const chat_msg *m, int n, int gen, const char *want)
{
    char out[512], err[128];
    int bos = 0;
    long len = chat_format("gemma", m, n, gen, out, sizeof out, &bos, err, sizeof err);
    cr_assert_eq(len, (long)strlen(want), "%s", out);
    cr_assert_str_eq(out, want);
    cr_assert_eq(bos, 1);
}

Test(chat, gemma_trim_no_system_no_generation_prompt)
{
    /* the official template trims content (not the system text) */
    const chat_msg a[] = {{"user", "  padded \n"}};
    expect_msgs(a, 1, 1, "<bos><start_of_turn>user\npadded<end_of_turn>\n<start_of_turn>model\n");
    expect_msgs(conv + 1, 3, 0,
                "<bos><start_of_turn>user\nHi<end_of_turn>\n"
                "<start_of_turn>model\nHello!<end_of_turn>\n"
                "<start_of_turn>user\nBye<end_of_turn>\n");
    /* beyond the official template (which refuses these): a system message
     * goes in front of the next user turn; with none to carry it, it is a
     * user turn of its own rather than lost */
    const chat_msg b[] = {{"user", "Hi"}, {"assistant", "Yes"}, {"system", "Be kind."},
                          {"user", "Bye"}};
    expect_msgs(b, 4, 1,
                "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nYes<end_of_turn>\n"
                "<start_of_turn>user\nBe kind.\n\nBye<end_of_turn>\n<start_of_turn>model\n");
    const chat_msg c[] = {{"system", "Only this."}};
    expect_msgs(c, 1, 1,
                "<bos><start_of_turn>user\nOnly this.<end_of_turn>\n<start_of_turn>model\n");
    const chat_msg d[] = {{"system", "S"}, {"assistant", "A"}};
    expect_msgs(d, 2, 0,
                "<bos><start_of_turn>user\nS<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n");
    cr_assert(chat_template_known("gemma"));
}

Test(chat, errors_and_truncation)
{
    char out[16], err[128];
    int bos;
    cr_assert_lt(chat_format("jinja", conv, 1, 1, out, sizeof out, &bos, err, sizeof err), 0);
    cr_assert(strstr(err, "unknown chat template") != NULL);
    chat_msg bad = {"robot", "x"};
    cr_assert_lt(chat_format("chatml", &bad, 1, 1, out, sizeof out, &bos, err, sizeof err), 0);
    /* a small buffer is truncated and NUL-terminated; the full length is returned */
    long n = chat_format("chatml", conv, 2, 0, out, sizeof out, &bos, err, sizeof err);
    cr_assert_gt(n, 15);
    cr_assert_eq(strlen(out), 15u);
    cr_assert(chat_template_known("zephyr") && !chat_template_known(NULL));
}
