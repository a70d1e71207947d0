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
